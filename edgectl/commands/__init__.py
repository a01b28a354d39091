"""edgectl subcommands: each module exposes ``add_parser(subparsers)``.

A subcommand's handler takes the parsed ``argparse.Namespace`` and returns the
process exit code; it raises ``CommandError`` for a failure it explains itself.
"""
