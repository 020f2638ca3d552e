"""``python -m hanorec.data {prepare,fetch-ml100k,render-posters,show}``.

- ``prepare --config X.yaml [--field value ...]``: write the prepared data (reused when
  the fingerprint matches; ``--force`` rebuilds).
- ``fetch-ml100k [--cache-dir DIR] [--no-posters]``: MovieLens-100K from the recbole wheel,
  plus its synthetic posters.
- ``render-posters --config X.yaml``: synthetic posters for the catalogue into image_root.
- ``show --config X.yaml [--index 0] [--protocol candidates] [--split test]
  [--image-budget 5] [--model-dir DIR]``: print one rendered prompt and its response
  (for ``show`` only, ``--split`` is the dataset split, not ``DataConfig.split``).

Errors in the recipe, the flags or the input files end with one ``error: ...`` line and exit
status 2 (``--debug`` or ``HANOREC_DEBUG=1`` shows the traceback).
"""

from __future__ import annotations

import argparse

from hanorec.cli import ArgumentParser, run
from hanorec.data.cli_args import ShowRun, help_text, parse_data_cli, parse_show_cli
from hanorec.data.config import PROTOCOLS, DataConfig, default_cache_dir

__all__ = ["main", "parse_data_cli"]


def _posters(config: DataConfig, out_dir: str | None = None, workers: int = 2) -> None:
    from hanorec.data.posters import render_posters
    from hanorec.data.readers import read_source

    _, catalogue = read_source(config)
    target = out_dir or config.path(config.image_root)
    if target is None:
        raise ValueError("render-posters needs image_root (where the posters go)")
    count = render_posters(catalogue.item_id, catalogue.title, catalogue.genres, target,
                           (config.poster_width, config.poster_height), workers=workers)
    print(f"rendered {count} posters into {target} ({len(catalogue) - count} already there)")


def _show(run: ShowRun, args: argparse.Namespace) -> None:
    """Print one prepared row as the recipe's stages render it (its ``prompt:`` section)."""
    from hanorec.data.catalog import Catalog
    from hanorec.data.prepared import read_protocol
    from hanorec.data.prompts import LABELS, build_prompt, plain_text, response_text

    config, style = run.data, run.prompt.style()
    output = config.path(config.output_dir)
    folder = output / args.protocol
    if not folder.is_dir():
        raise ValueError(f"{folder}: protocol {args.protocol!r} is not prepared here; run "
                         "`python -m hanorec.data prepare` with it in data.protocols")
    rows = read_protocol(output, args.protocol, splits=(args.split,))[args.split]
    if not 0 <= args.index < len(rows):
        raise ValueError(f"--index {args.index}: the {args.split} split of {args.protocol} has "
                         f"{len(rows)} rows (0 to {len(rows) - 1})")
    row = rows[args.index]
    catalog = Catalog.from_prepared(output)
    prompt = build_prompt(row, catalog, args.protocol, image_budget=run.prompt.image_budget,
                          with_images=run.prompt.with_images, style=style)
    if args.model_dir:
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(args.model_dir, trust_remote_code=False)
        text = processor.apply_chat_template(prompt.messages, add_generation_prompt=True,
                                             tokenize=False)
    else:
        text = plain_text(prompt.messages)
    answer = "Yes" if row.get("label") == 1 else "No" if "label" in row else row["target"]
    if answer in ("Yes", "No") or style.answer == "title":
        print(text + style.display_title(response_text(answer, catalog)))
    elif style.answer == "index":
        print(text + LABELS[list(row["candidates"]).index(answer)])
    else:
        print(text + f"[answer: head read-out, target {catalog.title(answer)!r}]")
    print(f"\n[{len(prompt.image_paths)} images: {[str(p) for p in prompt.image_paths]}]")


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    parser = ArgumentParser(prog="python -m hanorec.data", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter,
                            epilog="DataConfig flags:\n" + help_text())
    parser.add_argument("command", choices=["prepare", "fetch-ml100k", "render-posters", "show"])
    parser.add_argument("--force", action="store_true", help="prepare: rebuild even if reusable")
    parser.add_argument("--no-posters", action="store_true", help="fetch-ml100k: skip posters")
    parser.add_argument("--workers", type=int, default=2, help="poster rendering processes")
    parser.add_argument("--cache-dir", default=None,
                        help="data cache (default $HANOREC_CACHE or ~/.cache/hanorec)")
    parser.add_argument("--debug", action="store_true",
                        help="show the Python traceback of an error (also: HANOREC_DEBUG=1)")
    args, rest = parser.parse_known_args(argv)
    if args.command == "show":  # here --split names the dataset split, not DataConfig.split
        show = ArgumentParser(prog="python -m hanorec.data show")
        show.add_argument("--index", type=int, default=0, help="row index")
        show.add_argument("--protocol", default="candidates", choices=PROTOCOLS, help="protocol")
        show.add_argument("--split", default="test", choices=["train", "validation", "test"],
                          help="train, validation or test")
        show.add_argument("--model-dir", default=None, help="saved processor directory")
        show_args, rest = show.parse_known_args(rest)
        vars(args).update(vars(show_args))
    if args.cache_dir and args.command != "fetch-ml100k":
        rest += ["--cache-dir", args.cache_dir]
    if args.command == "fetch-ml100k":
        from hanorec.data.fetch import fetch_ml100k

        cache = args.cache_dir or str(default_cache_dir())
        config = parse_data_cli(rest + ["--cache-dir", cache])
        target = fetch_ml100k(cache)
        if not args.no_posters:
            _posters(config, str(target / "posters"), args.workers)
        return 0
    if args.command == "show":
        _show(parse_show_cli(rest), args)
        return 0
    config = parse_data_cli(rest)
    if args.command == "prepare":
        from hanorec.data.prepare import prepare
        from hanorec.data.splits import SPLITS

        manifest = prepare(config, force=args.force)
        counts = manifest["counts"]
        print(f"{manifest['users']} users, {manifest['items']} items, "
              f"{manifest['interactions']} interactions -> {config.path(config.output_dir)}")
        for protocol, splits in counts.items():
            print(f"  {protocol:<10} " + "  ".join(f"{s}={splits[s]}" for s in SPLITS))
    elif args.command == "render-posters":
        _posters(config, workers=args.workers)
    return 0


if __name__ == "__main__":
    run(main)
