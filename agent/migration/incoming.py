"""The destination side of a cross-host migration: prepare targets, then commit or abort.

The source agent drives it over the authenticated agent API:
- ``prepare``: confine every destination path in the named storage root, check free space, create the
  target images (empty tops whose backing points at the destination's copy of the layer below, or flat
  images when flattening) and record every created file before creating it; a disk marked ``precreated``
  has its target made by the management plane: it is checked (``agent.migration.targets``), never
  created, recorded or removed;
- layer transfers fill the lower layers (``agent.transfer``);
- ``commit``: the VM runs here from the new paths; forget the record (files now belong to the VM);
- ``abort``: remove every file this migration created; idempotent, also after an agent restart.

Records live as small JSON files under ``state_dir/incoming`` so a restarted destination agent still
knows what to remove.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from agent.errors import AgentError, Conflict, InvalidRequest, MigrationFailed, NotFound, PreflightFailed
from agent.migration.plan import LayerPlan
from agent.migration.request import normalise_uuid
from agent.migration.targets import check_precreated_target
from agent.storage import qemuimg
from agent.storage.roots import StorageRoot, StorageRoots
from agent.storage.space import check_free_space
from agent.transfer.export import IncomingLayer as LayerExport
from agent.transfer.verify import LayerDigest, verify_layer
from agent.virt.domxml import parse_disks
from agent.virt.host import VirtHost

log = logging.getLogger(__name__)

#: Seconds an abort waits for the paused incoming domain of a failed migration to disappear.
INCOMING_GONE_S = 20
#: How often the start-up reconciliation looks again at a record whose migration is still in flight, and for
#: how long at most.
RECONCILE_EVERY_S = 5.0
RECONCILE_GIVE_UP_S = 3600.0


class _Wire(BaseModel):
    model_config = ConfigDict(extra="forbid")


class IncomingLayer(_Wire):
    name: str = Field(max_length=255, description="file name (or absolute path) at the destination")
    format: str = Field(pattern="^(qcow2|raw)$")
    virtualSize: int = Field(ge=0)
    actualSize: int = Field(ge=0)
    clusterSize: int | None = Field(
        default=None, ge=512, le=2 * 1024 * 1024, description="qcow2 cluster size of the source layer"
    )

    @classmethod
    def of(cls, layer: LayerPlan) -> IncomingLayer:
        """The wire form of a planned lower layer (named by its file name; the destination places it)."""
        return cls(
            name=os.path.basename(layer.src),
            format=layer.format,
            virtualSize=layer.virtual_size,
            actualSize=layer.actual_size,
            clusterSize=layer.cluster_size,
        )


class IncomingDisk(_Wire):
    target: str = Field(pattern="^[a-z]{2,3}[a-z]{1,2}$")
    volumeUuid: str = Field(max_length=64)
    top: str = Field(max_length=4096, description="file name or absolute path of the destination top")
    format: str = Field(pattern="^(qcow2|raw)$")
    virtualSize: int = Field(ge=0)
    estimatedBytes: int = Field(ge=0)
    flatten: bool
    layers: list[IncomingLayer] = Field(default_factory=list, max_length=64)  # base first
    offline: bool = Field(
        default=False,
        description="the VM is shut off: every layer, the top included (the last one), is transferred",
    )
    precreated: bool = Field(
        default=False, description="the target exists already; check it, never create it"
    )


class IncomingSpec(_Wire):
    migrationId: str
    vmUuid: str
    dstPrimaryStorageUuid: str
    disks: list[IncomingDisk] = Field(min_length=1, max_length=64)

    # The migration id names the record file and both ids reach libvirt: anything but a uuid is a 400
    # (found by the API fuzzing: a malformed id was a 500).
    @field_validator("migrationId", "vmUuid")
    @classmethod
    def _uuid(cls, value: str) -> str:
        return normalise_uuid(value)


class IncomingService:
    """Prepared incoming migrations on this host, by id (the source task uuid)."""

    def __init__(
        self,
        roots: StorageRoots,
        host: VirtHost | None,
        state_dir: Path,
        *,
        peer_libvirt_uri: str,
        migration_address: str,
    ) -> None:
        self.roots = roots
        self.host = host
        self.dir = state_dir / "incoming"
        self.peer_libvirt_uri = peer_libvirt_uri
        self.migration_address = migration_address
        self._lock = asyncio.Lock()
        self._layers: dict[tuple[str, str], LayerExport] = {}  # (migration id, path) -> open export

    def _record_path(self, migration_id: str) -> Path:
        return self.dir / f"{normalise_uuid(migration_id)}.json"

    def _load(self, migration_id: str) -> dict[str, Any]:
        try:
            data: dict[str, Any] = json.loads(self._record_path(migration_id).read_text())
            return data
        except FileNotFoundError:
            raise NotFound(f"no incoming migration {migration_id} on this host") from None

    def _save(self, record: dict[str, Any]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = self._record_path(record["migrationId"])
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record))
        os.replace(tmp, path)

    def list_ids(self) -> list[str]:
        if not self.dir.exists():
            return []
        return [p.stem for p in self.dir.glob("*.json")]

    async def prepare(self, spec: IncomingSpec) -> dict[str, Any]:
        """Create the destination images; answers with their paths and where to migrate to."""
        async with self._lock:
            if self._record_path(spec.migrationId).exists():
                existing = self._load(spec.migrationId)
                if existing["spec"] != spec.model_dump():
                    raise Conflict(f"incoming migration {spec.migrationId} exists with another spec")
                return self._answer(existing)
            root = self.roots.get(spec.dstPrimaryStorageUuid, field="dstPrimaryStorageUuid")
            layout = self._layout(spec, root)
            await self._preflight(spec, root, layout)
            record: dict[str, Any] = {
                "migrationId": spec.migrationId,
                "vmUuid": spec.vmUuid,
                "spec": spec.model_dump(),
                "layout": layout,
                "created": [],
                "state": "preparing",
            }
            self._save(record)
            try:
                for disk, paths in zip(spec.disks, layout["disks"], strict=True):
                    await self._create_disk(record, disk, paths)
            except BaseException:
                await asyncio.shield(self._remove(record))
                raise
            record["state"] = "prepared"
            self._save(record)
            log.info(
                "incoming migration %s for VM %s prepared in storage %s",
                spec.migrationId,
                spec.vmUuid,
                root.uuid,
            )
            return self._answer(record)

    def _layout(self, spec: IncomingSpec, root: StorageRoot) -> dict[str, Any]:
        disks = []
        seen: set[str] = set()
        for i, disk in enumerate(spec.disks):
            top = str(root.confine(disk.top, f"disks[{i}].top"))
            top_dir = os.path.dirname(top)
            layers = [
                str(
                    root.confine(
                        os.path.join(top_dir, os.path.basename(layer.name)), f"disks[{i}].layers[{j}].name"
                    )
                )
                for j, layer in enumerate(disk.layers)
            ]
            for path in [top, *layers]:
                if path in seen and path not in layers:
                    raise PreflightFailed(f"two images would be written to {path}", field=f"disks[{i}]")
                seen.add(path)
            disks.append({"target": disk.target, "top": top, "layers": layers})
        return {"disks": disks}

    async def _preflight(self, spec: IncomingSpec, root: StorageRoot, layout: dict[str, Any]) -> None:
        needed = 0
        for i, (disk, paths) in enumerate(zip(spec.disks, layout["disks"], strict=True)):
            if disk.precreated:
                await check_precreated_target(
                    paths["top"],
                    fmt=disk.format,
                    virtual_size=disk.virtualSize,
                    flatten=disk.flatten,
                    field=f"disks[{i}].top",
                )
            for path in [] if disk.precreated else [paths["top"], *paths["layers"]]:
                if os.path.lexists(path):
                    raise PreflightFailed(
                        f"target {path} already exists on this host",
                        code="AGENT.TARGET_EXISTS",
                        field="disks",
                        details="remove it or choose another destination",
                    )
            needed += disk.estimatedBytes + sum(layer.actualSize for layer in disk.layers)
        await check_free_space(root, needed, field="dstPrimaryStorageUuid", where=" on this host")

    async def _create_disk(self, record: dict[str, Any], disk: IncomingDisk, paths: dict[str, Any]) -> None:
        """Create the top now; lower layers are created by their transfer (``open_layer``), base first."""
        if disk.precreated or disk.offline:
            return
        below = paths["layers"][-1] if paths["layers"] else None
        below_fmt = disk.layers[-1].format if disk.layers else None
        record["created"].append(paths["top"])
        self._save(record)
        await qemuimg.create(
            paths["top"],
            disk.format,
            disk.virtualSize,
            backing=None if disk.flatten else below,
            backing_format=None if disk.flatten else below_fmt,
            backing_may_be_missing=True,
        )

    async def open_layer(self, migration_id: str, target: str, index: int) -> dict[str, Any]:
        """Create lower layer ``index`` of ``target`` and export it over NBD (TLS-PSK) for the source to
        fill; answers the endpoint, which only the authenticated source agent learns."""
        async with self._lock:
            record = self._load(migration_id)
            path, spec, backing, backing_fmt = self._layer(record, target, index)
            key = (normalise_uuid(migration_id), path)
            if key in self._layers:
                return {"path": path, "endpoint": self._layers[key].endpoint.to_dict()}
            if path in record.get("layersDone", []):
                raise Conflict(f"layer {path} was already transferred and verified")
            if path not in record["created"]:
                record["created"].append(path)
                self._save(record)
            if os.path.lexists(path):  # a partial copy from before a restart: start it over
                os.unlink(path)
            layer = await LayerExport.prepare(
                path,
                spec["format"],
                spec["virtualSize"],
                listen_host=self.migration_address,
                backing=backing,
                backing_format=backing_fmt,
                cluster_size=spec.get("clusterSize"),
            )
            self._layers[key] = layer
            log.info(
                "incoming migration %s: layer %s exported on %s", migration_id, path, self.migration_address
            )
            return {"path": path, "endpoint": layer.endpoint.to_dict()}

    async def finish_layer(
        self, migration_id: str, target: str, index: int, digest: dict[str, Any]
    ) -> dict[str, Any]:
        """The source finished sending: close the export, then check the layer against the source's digest
        and its backing pointer. A layer that does not match is removed."""
        async with self._lock:
            record = self._load(migration_id)
            path, spec, backing, backing_fmt = self._layer(record, target, index)
            layer = self._layers.pop((normalise_uuid(migration_id), path), None)
            if layer is None:
                if path in record.get("layersDone", []):
                    return {"path": path, "verified": True}
                raise NotFound(f"layer {path} is not being transferred", field="index")
            await layer.finish()
            try:
                await verify_layer(
                    path,
                    spec["format"],
                    LayerDigest.from_dict(digest),
                    backing=backing,
                    backing_format=backing_fmt,
                )
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                raise
            record.setdefault("layersDone", []).append(path)
            self._save(record)
            log.info("incoming migration %s: layer %s verified", migration_id, path)
            return {"path": path, "verified": True}

    def _layer(
        self, record: dict[str, Any], target: str, index: int
    ) -> tuple[str, dict[str, Any], str | None, str | None]:
        """(path, spec, backing path, backing format) of lower layer ``index`` (base = 0) of ``target``."""
        for disk, spec in zip(record["layout"]["disks"], record["spec"]["disks"], strict=True):
            if disk["target"] != target:
                continue
            if not 0 <= index < len(disk["layers"]):
                raise NotFound(f"disk {target} has no layer {index}", field="index")
            backing = disk["layers"][index - 1] if index > 0 else None
            backing_fmt = spec["layers"][index - 1]["format"] if index > 0 else None
            layer_spec: dict[str, Any] = spec["layers"][index]
            return disk["layers"][index], layer_spec, backing, backing_fmt
        raise NotFound(f"incoming migration {record['migrationId']} has no disk {target}", field="target")

    def _answer(self, record: dict[str, Any]) -> dict[str, Any]:
        return {
            "migrationId": record["migrationId"],
            "state": record["state"],
            "disks": record["layout"]["disks"],
            "libvirtUri": self.peer_libvirt_uri,
            "migrationUri": f"tcp://{self.migration_address}",
            "migrationAddress": self.migration_address,
        }

    async def get(self, migration_id: str) -> dict[str, Any]:
        return self._answer(self._load(migration_id))

    async def commit(self, migration_id: str) -> dict[str, Any]:
        """The VM arrived: check it runs here from the new paths, then forget the record."""
        async with self._lock:
            record = self._load(migration_id)
            if self.host is None:
                raise MigrationFailed("no libvirt connection on the destination agent")
            live = {d.target: d for d in parse_disks(await self.host.live_xml(record["vmUuid"]))}
            for disk in record["layout"]["disks"]:
                got = live.get(disk["target"])
                if got is None or got.source != disk["top"]:
                    raise MigrationFailed(
                        f"VM {record['vmUuid']} does not use {disk['top']} for {disk['target']} here",
                        code="AGENT.VERIFY_FAILED",
                    )
            persistent = await self.host.is_persistent(record["vmUuid"])
            self._record_path(migration_id).unlink(missing_ok=True)
            log.info("incoming migration %s committed: VM %s runs here", migration_id, record["vmUuid"])
            return {"migrationId": migration_id, "state": "committed", "persistent": persistent}

    async def define(self, migration_id: str, xml: str) -> dict[str, Any]:
        """Offline move: define the VM here from the transferred images, then forget the record."""
        async with self._lock:
            record = self._load(migration_id)
            if self.host is None:
                raise MigrationFailed("no libvirt connection on the destination agent")
            wanted = {d["target"]: d["top"] for d in record["layout"]["disks"]}
            given = {d.target: d.source for d in parse_disks(xml)}
            for target, top in wanted.items():
                if given.get(target) != top:
                    raise InvalidRequest(
                        f"the definition points {target} at {given.get(target)}, not {top}", field="xml"
                    )
            missing = [p for p in record["created"] if not os.path.exists(p)]
            if missing or len(record.get("layersDone", [])) < len(record["created"]):
                raise Conflict(
                    "not every image has arrived and been verified", details=", ".join(missing) or None
                )
            await self.host.define_xml(xml)
            self._record_path(migration_id).unlink(missing_ok=True)
            log.info("incoming migration %s: VM %s defined here", migration_id, record["vmUuid"])
            return {"migrationId": migration_id, "state": "defined"}

    async def abort(self, migration_id: str) -> dict[str, Any]:
        """Remove what the migration created; unknown ids are fine (idempotent)."""
        async with self._lock:
            try:
                record = self._load(migration_id)
            except NotFound:
                return {"migrationId": migration_id, "state": "aborted", "removed": []}
            if self.host is not None and await self._vm_runs_here(record["vmUuid"]):
                raise Conflict(
                    f"VM {record['vmUuid']} already runs on this host; refusing to remove its files",
                    details="the migration finished; commit it instead",
                )
            for key in [k for k in self._layers if k[0] == normalise_uuid(migration_id)]:
                await self._layers.pop(key).abort()
            removed = await self._remove(record)
            self._record_path(migration_id).unlink(missing_ok=True)
            log.info("incoming migration %s aborted; removed %d files", migration_id, len(removed))
            return {"migrationId": migration_id, "state": "aborted", "removed": removed}

    async def reconcile(
        self, *, every_s: float = RECONCILE_EVERY_S, give_up_s: float = RECONCILE_GIVE_UP_S
    ) -> None:
        """At start: settle every record an earlier life of this agent left, from what this host's libvirtd
        says (the source agent may be gone, or may have ended its task while this agent was down):
        - the VM runs here from the record's tops: the migration arrived; commit (forget the record);
        - no VM here: nothing is in flight any more (an incoming migration shows as a paused domain from
          its start); remove what the record created. A source still at work then fails cleanly;
        - otherwise (paused: a migration in flight; libvirtd not answering): look again every ``every_s``
          until it settles, for up to ``give_up_s``; then keep the record and say so.
        """
        assert self.host is not None
        pending = set(self.list_ids())
        if pending:
            log.info("reconciling %d incoming migration record(s) left from before the start", len(pending))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + give_up_s
        while pending:
            for migration_id in sorted(pending):
                try:
                    settled = await self._reconcile_one(migration_id)
                except Exception:
                    log.exception("incoming migration %s: reconciliation failed", migration_id)
                    raise
                if settled:
                    pending.discard(migration_id)
            if not pending:
                break
            if loop.time() > deadline:
                for migration_id in sorted(pending):
                    log.warning(
                        "incoming migration %s: still unsettled after %.0f s; record kept (abort or commit "
                        "it through the API once the VM's place is known)",
                        migration_id,
                        give_up_s,
                    )
                return
            await asyncio.sleep(every_s)

    async def _reconcile_one(self, migration_id: str) -> bool:
        """True when the record was settled (committed, removed, or gone already)."""
        assert self.host is not None
        async with self._lock:
            try:
                record = self._load(migration_id)
            except NotFound:
                return True
            vm_uuid = record["vmUuid"]
            tops = {d["target"]: d["top"] for d in record["layout"]["disks"]}
            try:
                state = await self.host.domain_state(vm_uuid)
            except NotFound:
                state = "undefined"
            except AgentError as err:
                log.info("incoming migration %s: libvirtd not answering (%s); later", migration_id, err)
                return False
            if state in ("running", "shutoff"):
                xml = await (self.host.live_xml if state == "running" else self.host.inactive_xml)(vm_uuid)
                live = {d.target: d.source for d in parse_disks(xml)}
                if all(live.get(t) == top for t, top in tops.items()):
                    self._record_path(migration_id).unlink(missing_ok=True)
                    log.info(
                        "incoming migration %s committed at start: VM %s is %s here from its new volumes",
                        migration_id,
                        vm_uuid,
                        state,
                    )
                    return True
                log.error(
                    "incoming migration %s: VM %s is %s here but not from the prepared volumes; record kept",
                    migration_id,
                    vm_uuid,
                    state,
                )
                return True
            if state == "undefined":
                removed = await self._remove(record)
                self._record_path(migration_id).unlink(missing_ok=True)
                log.info(
                    "incoming migration %s for VM %s: the VM is not here and nothing is in flight; removed "
                    "%d file(s) it created",
                    migration_id,
                    vm_uuid,
                    len(removed),
                )
                return True
            log.info(
                "incoming migration %s: VM %s is %s here; looking again later", migration_id, vm_uuid, state
            )
            return False

    async def _vm_runs_here(self, vm_uuid: str) -> bool:
        """True when the VM runs here. A *paused* domain is what an incoming migration looks like until it
        switches over, and libvirt removes it shortly after a failed one (after a source libvirtd restart
        only once its recovery ran): give it a while to go before refusing."""
        assert self.host is not None
        for _ in range(INCOMING_GONE_S):
            try:
                state = await self.host.domain_state(vm_uuid)
            except NotFound:
                return False
            if state != "paused":
                return state == "running"
            await asyncio.sleep(1)
        return True

    async def _remove(self, record: dict[str, Any]) -> list[str]:
        removed = []
        for path in reversed(record["created"]):
            if self.roots.owner_of(path) is None:
                continue
            try:
                os.unlink(path)
                removed.append(path)
            except FileNotFoundError:
                pass
        return removed
