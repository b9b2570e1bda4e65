"""What people read: task tables and details, the end-of-task summary, VMs and the host.

Readers are lenient about the answer's shape (a missing key prints ``-``): the CLI of one version must stay
usable against agents of the next.
"""

from __future__ import annotations

from typing import Any

from rich import box
from rich.table import Table

from agent.client import ErrorCodeBody, TaskView

from .output import Output, human_bytes, human_duration, human_rate, number


def _pick(data: dict[str, Any], *keys: str) -> Any:
    for key in keys:
        value = data.get(key)
        if value is not None:
            return value
    return None


def _text(value: Any) -> str:
    return "-" if value is None or value == "" else str(value)


def _percent(task: TaskView) -> str:
    percent = number((task.get("progress") or {}).get("percent"))
    return "-" if percent is None else f"{percent:.1f}%"


def _table(*columns: str) -> Table:
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    for column in columns:
        table.add_column(column, no_wrap=True, overflow="ignore")
    return table


def task_table(out: Output, tasks: list[TaskView]) -> None:
    if not tasks:
        out.line("no tasks")
        return
    table = _table("TASK", "VM", "STATE", "PHASE", "PROGRESS", "RATE", "ERROR")
    for task in tasks:
        error = task.get("error") or {}
        progress = task.get("progress") or {}
        table.add_row(
            _text(task.get("taskUuid")),
            _text(task.get("vmUuid")),
            _text(task.get("state")),
            _text(task.get("phase")),
            _percent(task),
            human_rate(number(progress.get("bytesPerSecond"))),
            _text(error.get("code")),
        )
    out.show(table)


def task_detail(out: Output, task: TaskView) -> None:
    """``show``: everything the task says about itself, then what ``summary`` adds once it is done."""
    progress = task.get("progress") or {}
    out.line(f"task       {_text(task.get('taskUuid'))}")
    out.line(f"vm         {_text(task.get('vmUuid'))}")
    out.line(f"state      {_text(task.get('state'))}")
    out.line(f"phase      {_text(task.get('phase'))}")
    queue = task.get("queue")
    if isinstance(queue, dict):
        out.line(f"queue      position {_text(queue.get('position'))}: {_text(queue.get('reason'))}")
    done, total = number(progress.get("bytesDone")), number(progress.get("bytesTotal"))
    out.line(f"progress   {_percent(task)}  {human_bytes(done)} / {human_bytes(total)}")
    out.line(f"rate       {human_rate(number(progress.get('bytesPerSecond')))}")
    out.line(f"eta        {human_duration(number(progress.get('etaSeconds')))}")
    tuning = task.get("tuning") or {}
    if tuning:
        bandwidth = tuning.get("bandwidth")
        shown_bw = "uncapped" if bandwidth is None else f"{bandwidth} MiB/s"
        out.line(f"tuning     bandwidth {shown_bw}, downtime {_text(tuning.get('downTime'))} ms")
    for item in task.get("volumes") or []:
        if isinstance(item, dict):
            nested = item.get("progress")
            counters: dict[str, Any] = nested if isinstance(nested, dict) else item
            percent = number(counters.get("percent"))
            shown = "-" if percent is None else f"{percent:.1f}%"
            name = _text(_pick(item, "name", "uuid", "target", "installPath"))
            item_done = human_bytes(number(counters.get("bytesDone")))
            item_total = human_bytes(number(counters.get("bytesTotal")))
            out.line(f"item       {name}  {shown}  {item_done} / {item_total}")
    _outcome(out, task)


def summary(out: Output, task: TaskView) -> None:
    """After ``--wait``/``watch``: the final state, the measured downtime and where the volumes are now."""
    out.line(f"task {_text(task.get('taskUuid'))}: {_text(task.get('state'))}")
    _outcome(out, task)


def _outcome(out: Output, task: TaskView) -> None:
    downtime = number(task.get("downtimeMs"))
    if downtime is not None:
        out.line(f"downtime   {downtime:.0f} ms")
    error = task.get("error")
    if error:
        for line in error_lines(error):
            out.line(line)
    for volume in inventory_volumes(task.get("inventory")):
        kind = ", ".join(str(volume[k]) for k in ("deviceName", "type") if volume.get(k))
        kind = f" ({kind})" if kind else ""
        storage = f"  storage {volume['primaryStorageUuid']}" if volume.get("primaryStorageUuid") else ""
        out.line(f"volume     {_text(volume.get('uuid'))}{kind}: {_text(volume.get('installPath'))}{storage}")
        for layer in _chain(volume):
            out.line(f"             <- {layer}")


def error_lines(error: ErrorCodeBody, prefix: str = "error") -> list[str]:
    """``error  description [CODE]``, its details, then the cause chain, one line each."""
    lines: list[str] = []
    current: ErrorCodeBody | None = error
    label = prefix
    while current:
        field = f" (field {current['field']})" if current.get("field") else ""
        lines.append(f"{label:<10} {_text(current.get('description'))} [{_text(current.get('code'))}]{field}")
        if current.get("details"):
            lines.append(f"{'':<10} {current.get('details')}")
        current, label = current.get("cause"), "cause"
    return lines


def inventory_volumes(inventory: Any) -> list[dict[str, Any]]:
    """The volume list of a final inventory, whether it is a list or a VM inventory holding one."""
    if isinstance(inventory, dict):
        for key in ("volumes", "allVolumes"):
            if isinstance(inventory.get(key), list):
                inventory = inventory[key]
                break
        else:
            inventory = [inventory] if "installPath" in inventory else []
    if not isinstance(inventory, list):
        return []
    return [item for item in inventory if isinstance(item, dict)]


def _chain(volume: dict[str, Any]) -> list[str]:
    chain = _pick(volume, "backingChain", "chain")
    if not isinstance(chain, list):
        return []
    layers = []
    for layer in chain:
        if isinstance(layer, dict):
            layers.append(_text(_pick(layer, "installPath", "path", "filename")))
        else:
            layers.append(_text(layer))
    return layers


def vm_table(out: Output, vms: list[dict[str, Any]]) -> None:
    if not vms:
        out.line("no VMs")
        return
    table = _table("VM", "NAME", "STATE", "PERSISTENT")
    for vm in vms:
        persistent = vm.get("persistent")
        table.add_row(
            _text(_pick(vm, "uuid", "vmUuid")),
            _text(vm.get("name")),
            _text(vm.get("state")),
            "-" if persistent is None else ("yes" if persistent else "no"),
        )
    out.show(table)


def vm_detail(out: Output, vm: dict[str, Any]) -> None:
    """The VM's disks, each with its backing chain below it (the agent lists the chain top first)."""
    out.line(f"vm         {_text(_pick(vm, 'uuid', 'vmUuid'))}")
    out.line(f"name       {_text(vm.get('name'))}")
    out.line(f"state      {_text(vm.get('state'))}")
    for disk in vm.get("disks") or []:
        if not isinstance(disk, dict):
            continue
        target = _text(_pick(disk, "target", "deviceName"))
        path = _pick(disk, "source", "installPath", "path")
        chain = _pick(disk, "chain", "backingChain")
        layers = [layer for layer in chain if isinstance(layer, dict)] if isinstance(chain, list) else []
        top = layers[0] if layers and _pick(layers[0], "path", "installPath") == path else None
        size = number(_pick(top or disk, "virtualSize", "size"))
        kind = disk.get("device") if disk.get("device") not in (None, "disk") else None
        extra = f"  ({kind})" if kind else ""
        out.line(
            f"disk       {target}  {_text(path)}  {_text(disk.get('format'))}  {human_bytes(size)}{extra}"
        )
        for layer in layers[1:] if top is not None else layers:
            out.line(
                f"             <- {_text(_pick(layer, 'path', 'installPath'))}  {_text(layer.get('format'))}"
            )
        if disk.get("chainError"):
            out.line(f"             chain unknown: {disk['chainError']}")


def host_detail(out: Output, host: dict[str, Any]) -> None:
    for key, value in host.items():
        if key in ("storage", "storageRoots"):
            continue
        if isinstance(value, dict):
            flat = "  ".join(f"{k}={_fact(k, v)}" for k, v in value.items())
            out.line(f"{key:<10} {flat}")
        else:
            out.line(f"{key:<10} {_fact(key, value)}")
    roots = _pick(host, "storage", "storageRoots")
    if isinstance(roots, list) and roots:
        table = _table("STORAGE", "KIND", "LOCATION", "FREE", "TOTAL")
        for root in roots:
            if isinstance(root, dict):
                problem = f"  ({root['error']})" if root.get("error") else ""
                table.add_row(
                    _text(root.get("uuid")),
                    _text(root.get("kind") or "file"),
                    _text(root.get("location") or root.get("path")) + problem,
                    human_bytes(number(_pick(root, "freeBytes", "free"))),
                    human_bytes(number(_pick(root, "totalBytes", "total"))),
                )
        out.show(table)


def _fact(key: str, value: Any) -> str:
    if isinstance(value, list):
        return " ".join(_text(item) for item in value)
    if "bytes" in key.lower() or key.lower() in ("total", "free", "available", "used"):
        amount = number(value)
        if amount is not None:
            return human_bytes(amount)
    return _text(value)
