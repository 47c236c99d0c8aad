"""``python -m zen_inductor demo`` runs the embedded model; ``explain`` prints the last report."""
import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m zen_inductor")
    sub = parser.add_subparsers(dest="command", required=True)
    explain = sub.add_parser("explain", help="print a compile report (default: latest under ZEN_INDUCTOR_DEBUG_DIR)")
    explain.add_argument("path", nargs="?", help="a dump folder or report.json")
    demo = sub.add_parser("demo", help="quantize, compile and run a small Llama; compare with eager and Inductor")
    from .demo import add_arguments

    add_arguments(demo)
    args = parser.parse_args(argv)
    if args.command == "explain":
        from .dumps import format_report, load_report

        try:
            report = load_report(args.path)
        except (OSError, ValueError) as e:
            print(f"no report: {e}", file=sys.stderr)
            return 1
        print(format_report(report))
        return 0
    from .demo import run

    return run(args)


if __name__ == "__main__":
    sys.exit(main())
