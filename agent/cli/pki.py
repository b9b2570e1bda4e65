"""``kvm-storage-agent pki init|issue|dn``: the cluster CA and the hosts' certificates (agent/pki.py)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from agent import pki

from .exits import Exit


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser("pki", help="the cluster's CA and the hosts' TLS certificates")
    cmds = parser.add_subparsers(dest="pki_command", required=True, metavar="PKI_COMMAND")
    init = cmds.add_parser("init", help="make the cluster CA in DIR (DIR/ca/cacert.pem, cakey.pem)")
    init.add_argument("dir", metavar="DIR", type=Path)
    init.add_argument("--cluster", default=pki.DEFAULT_CLUSTER, help="the organisation name in every DN")
    init.add_argument("--days", type=int, default=pki.CA_DAYS)
    issue = cmds.add_parser(
        "issue",
        help="a host's key and certificate in the /etc/pki layout (libvirt, QEMU, the agent), "
        "or an operator's client certificate (--client)",
    )
    issue.add_argument("dir", metavar="DIR", type=Path, help="the CA's directory (from pki init)")
    who = issue.add_mutually_exclusive_group(required=True)
    who.add_argument("--host", metavar="NAME", help="the host's name (its certificate's CN and a SAN)")
    who.add_argument("--client", metavar="NAME", help="an operator's client-only certificate")
    issue.add_argument(
        "--address",
        metavar="ADDR",
        action="append",
        default=[],
        help="an IP address or DNS name the host is reached at (repeat)",
    )
    issue.add_argument("--out", metavar="OUT", type=Path, help="default DIR/hosts/NAME or DIR/clients/NAME")
    issue.add_argument("--days", type=int, default=pki.HOST_DAYS)
    dn = cmds.add_parser("dn", help="a certificate's DN as tls_allowed_dn_list matches it")
    dn.add_argument("cert", metavar="CERT", type=Path)


def run(args: argparse.Namespace) -> int:
    try:
        if args.pki_command == "init":
            files = pki.init_ca(args.dir, cluster=args.cluster, days=args.days)
            print(files.cert)
        elif args.pki_command == "issue":
            if args.client:
                print(pki.issue_client(args.dir, args.client, out=args.out, days=args.days))
            else:
                if not args.address:
                    raise pki.PkiError("--host needs at least one --address (the host's migration address)")
                target = pki.issue_host(args.dir, args.host, args.address, out=args.out, days=args.days)
                print(target.root)
        else:
            print(pki.subject_dn(args.cert))
    except (pki.PkiError, OSError, ValueError) as err:
        print(f"kvm-storage-agent pki: {err}", file=sys.stderr)
        return Exit.USAGE
    return Exit.OK
