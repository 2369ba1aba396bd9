"""The console entry point: ``referee-synth SUBCOMMAND [ARGS]``.

Each subcommand runs the same ``main`` as ``python jobs/X.py`` (the form ``ray job submit`` uses),
with the same one-line errors and exit codes.
"""

from __future__ import annotations

import importlib
import sys

from jobs.cli import EXIT_OK, EXIT_USAGE, fail, run_main

# subcommand -> (module, one-line description)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "synthesize": ("jobs.synthesize", "prompts (Parquet) in, WebDataset shards of accepted samples out"),
    "prompts": ("jobs.prompts", "T2I-CompBench prompt lists (.txt) -> a prompt table (Parquet)"),
    "score": ("jobs.score", "T2I-CompBench BLIP-VQA scores of a samples folder or a run's shards"),
    "export-gors": ("jobs.export_gors", "a run's accepted samples in GORS's finetuning layout"),
    "report": ("jobs.report", "a run's HTML report (totals, histograms, contact sheets)"),
    "evaluate": ("jobs.evaluate", "the T2I-CompBench protocol through the job, as the paper's Table 3"),
    "finetune": ("jobs.finetune", "GORS-style LoRA finetuning of SD on runs' accepted samples"),
    "convert": ("jobs.convert_checkpoints", "original Salesforce checkpoints -> model folders"),
    "models": ("jobs.models", "`models fetch`: download, verify and convert every model a preset loads"),
    "doctor": ("jobs.doctor", "what a run of a config needs and what is missing (models, GPUs, Ray, disk)"),
}


def usage() -> str:
    width = max(map(len, SUBCOMMANDS))
    rows = "\n".join(f"  {name:<{width}}  {desc}" for name, (_, desc) in SUBCOMMANDS.items())
    return (
        "usage: referee-synth SUBCOMMAND [ARGS]\n\n"
        f"subcommands:\n{rows}\n\n"
        "`referee-synth SUBCOMMAND --help` shows a subcommand's arguments; "
        "`python jobs/X.py ...` runs the same code."
    )


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else list(argv)
    if not args or args[0] in ("-h", "--help"):
        print(usage(), file=sys.stdout if args else sys.stderr)
        sys.exit(EXIT_OK if args else EXIT_USAGE)
    name, rest = args[0], args[1:]
    if name not in SUBCOMMANDS:
        sys.exit(fail(f"unknown subcommand {name!r}; choose from {', '.join(SUBCOMMANDS)}"))
    module = importlib.import_module(SUBCOMMANDS[name][0])
    run_main(module.main, rest)


if __name__ == "__main__":
    main()
