"""The ``albef`` command: one sub-command per job, each a module of this package with ``main(argv)``.

Nothing outside ``albef.cli`` imports from it: the commands use the library, never the reverse.
"""

from __future__ import annotations

import importlib
import os
import sys

COMMANDS = {
    "main": ("albef.cli.mainjob", "the whole system on real images (emoji scenes, emoji, easy-VQA) with a report"),
    "ablation": (
        "albef.cli.ablation",
        "the paper's pretraining ablation in miniature on the scenes (docs/ablation.md)",
    ),
    "parity": ("albef.cli.parity", "recompute reference test vectors and compare"),
    "demo": ("albef.cli.demo", "short pretraining run on generated data, then zero-shot retrieval"),
    "bench": ("albef.cli.bench", "time one full pretraining step (forward, backward, AdamW)"),
    "pretrain": ("albef.cli.train", "pretrain from a YAML recipe (one process or torchrun)"),
    "finetune": (
        "albef.cli.train:finetune",
        "fine-tune (retrieval, grounding, VQA, SNLI-VE, NLVR2) from a YAML recipe",
    ),
    "evaluate": ("albef.cli.evaluate", "evaluate retrieval, grounding, VQA, SNLI-VE or NLVR2"),
    "data": ("albef.data.cli", "build data sets in the authors' JSON formats"),
    "convert": ("albef.cli.convert", "an authors' checkpoint (.pth) -> an albef model folder"),
    "predict": ("albef.cli.predict", "score image-text pairs, or a Grad-CAM overlay PNG"),
    "index": ("albef.cli.index", "FAISS gallery index: build (chunked), bench (recall vs exact)"),
    "search": ("albef.cli.index:search_main", "text -> image over a FAISS index, ITM re-ranked"),
    "serve": ("albef.cli.serve", "local web demo: search, match, ask, Grad-CAM (JSON API too)"),
}


#: input errors the commands raise with a message naming the file and the fix
USER_ERRORS = (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, ValueError)


def main(argv: list[str] | None = None) -> int:
    """Run ``albef COMMAND ...``. From the shell (``argv`` None), an input error (a missing or bad
    file, a value out of range) prints its message alone and exits with status 2;
    ``ALBEF_TRACEBACK=1`` shows the traceback. Called with ``argv`` (tests, scripts) it raises."""
    from_shell = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = [f"  {name:8s} {help_}" for name, (_, help_) in COMMANDS.items()]
        print("usage: albef COMMAND [options]\n\ncommands:\n" + "\n".join(lines))
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module_name, _, func = COMMANDS[argv[0]][0].partition(":")
    module = importlib.import_module(module_name)
    run = getattr(module, func or "main")
    try:
        return int(run(argv[1:]) or 0)
    except USER_ERRORS as e:
        if not from_shell or os.environ.get("ALBEF_TRACEBACK"):
            raise
        print(f"albef {argv[0]}: error: {e}\n(ALBEF_TRACEBACK=1 shows where it was raised)", file=sys.stderr)
        return 2
    except SystemExit as e:  # a command's own refusal, SystemExit("message"): the same status as the errors above
        if not from_shell or not isinstance(e.code, str) or os.environ.get("ALBEF_TRACEBACK"):
            raise
        prefix = "" if e.code.startswith(f"albef {argv[0]}") else f"albef {argv[0]}: error: "
        print(prefix + e.code, file=sys.stderr)
        return 2
