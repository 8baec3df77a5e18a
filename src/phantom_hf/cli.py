"""`phantom-hf`: the command line of phantom-hf.

Sub-commands: `demo` (the offline end-to-end demo), `convert` (a published checkpoint -> a Hub-ready folder),
`train` (the two-step Phantom recipe on a triple dataset), `chat` (ask a saved model about an image), `eval`
(lmms-eval benchmarks with the published prompts), `card` (render a model card), `push` (upload a saved folder
to the Hub) and `app` (a chat page in the browser). Heavy modules (torch, transformers, this package's model
code) are imported only by the sub-command that needs them, so `--help` stays quick; `phantom_hf_launch` is the
console script's entry.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

# Set to 1 to see the traceback of an error (as --debug does).
DEBUG_ENV = "PHANTOM_HF_DEBUG"


class CLIError(Exception):
    """A user-facing error: printed as `phantom-hf <command>: error: <message>`, exit status 2."""


def _one_line(error: BaseException) -> str:
    """An exception as one line: its message, whitespace collapsed; prefixed by its type when that says more than
    the message (not for the errors whose message is written for the user)."""
    from .hub import HubUploadError

    message = " ".join(str(error).split()) or type(error).__name__
    if isinstance(error, (CLIError, HubUploadError, ValueError, TypeError, OSError)):
        return message
    return f"{type(error).__name__}: {message}"


def _check_model_folder(folder: Path) -> None:
    """A saved model folder must hold a parseable config.json and readable safetensors files: checked up front so
    that the error names the file (transformers' errors often do not)."""
    config = folder / "config.json"
    if not config.is_file():
        raise CLIError(f"{str(folder)!r} is not a saved model folder (no config.json)")
    from .convert import read_json_file
    from .modeling.modeling_phantom import unreadable_weight_files

    try:
        read_json_file(config)
    except ValueError as error:
        raise CLIError(_one_line(error)) from error

    broken = unreadable_weight_files(folder)
    if broken:
        weights, error = broken[0]
        raise CLIError(f"weights file {weights} is unreadable (truncated or corrupt?): {_one_line(error)}") from error


def _load_model_and_processor(source: str, device: str = "cpu") -> tuple[Any, Any]:
    """A saved Phantom model (folder or Hub id) and its processor, or a `CLIError` naming what is wrong."""
    if Path(source).is_dir():
        _check_model_folder(Path(source))
    elif Path(source).exists():
        raise CLIError(f"model {source!r} is a file, not a saved model folder")
    elif not re.fullmatch(r"[\w.-]+/[\w.-]+", source):
        raise CLIError(f"model folder {source!r} does not exist (nor is it a Hub id, namespace/name)")
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import phantom_hf  # noqa: F401  registers Phantom with the Auto classes

    try:
        model = AutoModelForImageTextToText.from_pretrained(source, trust_remote_code=True)
        processor = AutoProcessor.from_pretrained(source, trust_remote_code=True)
    except Exception as error:
        raise CLIError(f"cannot load the model {source!r}: {_one_line(error)}") from error
    return model.to(device), processor


def _read_mapping(path: str | Path, what: str) -> dict[str, Any]:
    """A YAML (.yaml/.yml) or JSON file holding a mapping."""
    path = Path(path)
    if not path.is_file():
        raise CLIError(f"{what} file {str(path)!r} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as error:
        raise CLIError(f"cannot parse {what} file {str(path)!r}: {error}") from error
    if not isinstance(data, dict):
        raise CLIError(f"{what} file {str(path)!r} must hold a mapping, got {type(data).__name__}")
    return data


# ----------------------------------------------------------------------------------------------- demo


def _add_demo(subparsers: Any, selected: bool) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="build, train, evaluate, save and reload a small Phantom model offline in a few minutes",
        description="The whole life of a Phantom model offline on a CPU: a small model and tokenizer built from "
        "scratch, a synthetic visual task of coloured shapes, the two-step Phantom recipe, evaluation before and "
        "after, a Hub-ready folder with a model card, and answers through a transformers pipeline.",
    )
    if selected:
        from .demo import add_demo_arguments

        add_demo_arguments(parser)
    parser.set_defaults(handler=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from .demo import main as demo_main

    status = demo_main(args)
    return 0 if status is None else int(status)


# -------------------------------------------------------------------------------------------- convert


def _add_convert(subparsers: Any, selected: bool) -> None:
    parser = subparsers.add_parser(
        "convert",
        help="convert a published Phantom checkpoint into a Hub-ready folder",
        description="Convert a published Phantom checkpoint (Phantom-0.5B/1.8B/3.8B/7B) into a folder that "
        "transformers loads with from_pretrained.",
    )
    if selected:
        from .convert import add_convert_arguments

        add_convert_arguments(parser)
    parser.set_defaults(handler=_run_convert)


def _run_convert(args: argparse.Namespace) -> int:
    from .convert import run_convert

    status = run_convert(args)
    return 0 if status is None else int(status)


# ---------------------------------------------------------------------------------------------- train

# Flags of `train` that set a PhantomPOConfig field of both steps (flag dest -> field).
_TRAIN_FLAG_FIELDS = {
    "epochs": "num_train_epochs",
    "max_steps": "max_steps",
    "batch_size": "per_device_train_batch_size",
    "grad_accum": "gradient_accumulation_steps",
    "max_length": "max_length",
    "seed": "seed",
}


def _add_train(subparsers: Any, selected: bool) -> None:
    parser = subparsers.add_parser(
        "train",
        help="run the two-step Phantom recipe (PO on projector + Phantom modules, then SFT) on a triple dataset",
        description="Train a Phantom model on Phantom triples (images, prompt, chosen, rejected). Step 1 freezes "
        "the language model and trains the projector and the Phantom Dimension modules with Phantom Optimization; "
        "step 2 trains everything with SFT. Settings come from a YAML/JSON recipe, flags override it. A recipe "
        "holds: model, dataset, dataset_split, image_root, output_dir, steps ([1, 2]), common / step1 / step2 "
        "(PhantomPOConfig fields, e.g. learning_rate), lora (LoRA options for step 2), card (model-card fields), "
        "resume_from_checkpoint (true or a checkpoint folder, as --resume).",
    )
    parser.add_argument("recipe", nargs="?", default=None, help="YAML or JSON recipe file (optional)")
    parser.add_argument("--model", help="saved Phantom model folder or Hub id")
    parser.add_argument(
        "--dataset",
        help="triples: a JSON-lines file, a folder from Dataset.save_to_disk, or a Hub dataset id",
    )
    parser.add_argument("--dataset-split", default=None, help="split of a Hub dataset (default: train)")
    parser.add_argument(
        "--image-root", default=None, help="folder that relative image paths of a JSON-lines file start from"
    )
    parser.add_argument(
        "--output-dir",
        default=None,
        help="where the trained model goes (default: phantom-trained); step checkpoints go to OUTPUT_DIR-checkpoints",
    )
    parser.add_argument("--steps", default=None, help="steps to run: '1,2' (default), '1' or '2'")
    parser.add_argument("--epochs", type=float, default=None, help="epochs per step")
    parser.add_argument("--max-steps", type=int, default=None, help="optimizer steps per step (overrides --epochs)")
    parser.add_argument("--learning-rate", type=float, default=None, help="peak learning rate of both steps")
    parser.add_argument("--batch-size", type=int, default=None, help="triples per device per optimizer micro-step")
    parser.add_argument("--grad-accum", type=int, default=None, help="gradient accumulation steps")
    parser.add_argument("--max-length", type=int, default=None, help="longest prompt + answer in tokens")
    parser.add_argument("--seed", type=int, default=None, help="random seed")
    parser.add_argument(
        "--lora", action="store_true", help="step 2 with LoRA on the language model (merged at the end)"
    )
    parser.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=None,
        metavar="CHECKPOINT",
        help="continue an interrupted run: each step resumes from the last complete checkpoint in its checkpoint "
        "folder (incomplete ones are skipped, with a message) or starts afresh when there is none; with CHECKPOINT, "
        "the first step resumes from that folder",
    )
    parser.add_argument(
        "--accelerate-config",
        default=None,
        metavar="FILE",
        help="run under `accelerate launch --config_file FILE` (several processes or GPUs: DDP, FSDP2, DeepSpeed; "
        "see examples/accelerate/); the same as `accelerate launch --config_file FILE -m phantom_hf.cli train ...`",
    )
    parser.set_defaults(handler=_run_train)


def launch_with_accelerate(config_file: str | Path, argv: Sequence[str]) -> int:
    """Run `phantom-hf` with `argv` (its `--accelerate-config` option removed) under `accelerate launch
    --config_file config_file`, as `python -m phantom_hf.cli`; return its exit status."""
    import subprocess

    if not Path(config_file).is_file():
        raise CLIError(f"the accelerate config {str(config_file)!r} does not exist")
    rest, skip = [], False
    for argument in argv:
        if skip:
            skip = False
        elif argument == "--accelerate-config":
            skip = True
        elif not argument.startswith("--accelerate-config="):
            rest.append(argument)
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_file)]
    return subprocess.run([*command, "-m", "phantom_hf.cli", *rest], check=False).returncode


def resolve_recipe(args: argparse.Namespace) -> dict[str, Any]:
    """The training recipe: the recipe file (if any) with the command-line flags applied on top, checked
    (`recipe.check_recipe`)."""
    from .recipe import RecipeError, check_recipe

    recipe = _read_mapping(args.recipe, "recipe") if args.recipe else {}
    for flag in ("model", "dataset", "dataset_split", "image_root", "output_dir", "steps"):
        if getattr(args, flag) is not None:
            recipe[flag] = getattr(args, flag)
    common = {field: getattr(args, flag) for flag, field in _TRAIN_FLAG_FIELDS.items() if getattr(args, flag) is not None}
    if args.learning_rate is not None:
        common["learning_rate"] = args.learning_rate
        for step in ("step1", "step2"):
            if isinstance(recipe.get(step), Mapping):
                recipe[step] = {key: value for key, value in recipe[step].items() if key != "learning_rate"}
    if common:
        recipe["common"] = {**(recipe.get("common") or {}), **common}
    if args.lora:
        recipe["lora"] = recipe.get("lora") or {}
    if args.resume is not None:
        recipe["resume_from_checkpoint"] = args.resume
    try:
        return check_recipe(recipe)
    except RecipeError as error:
        raise CLIError(str(error)) from error


def _run_train(args: argparse.Namespace) -> int:
    if args.accelerate_config is not None:
        return launch_with_accelerate(args.accelerate_config, args.argv)
    recipe = resolve_recipe(args)
    from .recipe import RecipeError, train_from_recipe

    try:
        result = train_from_recipe(recipe, load_model=_load_model_and_processor)
    except RecipeError as error:
        raise CLIError(str(error)) from error
    print(f"saved the trained model to {result.output_dir}")
    return 0


# ----------------------------------------------------------------------------------------------- chat


def _add_chat(subparsers: Any, selected: bool) -> None:
    parser = subparsers.add_parser(
        "chat",
        help="ask a saved Phantom model about an image (one question, or interactive)",
        description="Ask a saved Phantom model a question about an image. With --question it answers once; "
        "without, it reads questions from standard input (':image PATH' switches the image, ':quit' ends).",
    )
    parser.add_argument("model", help="saved Phantom model folder or Hub id")
    parser.add_argument("--image", default=None, help="image file (without it the question is text-only)")
    parser.add_argument("--question", "-q", default=None, help="one question; omit for an interactive session")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="longest answer in tokens (default 32)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.set_defaults(handler=_run_chat)


def _open_image(path: str | None) -> Any:
    """The image file decoded as the model's processor decodes it (an RGB array: the processor is the one place an
    image becomes pixels), or a `CLIError` naming the file and the problem."""
    if path is None:
        return None
    if Path(path).is_dir():
        raise CLIError(f"image file {path!r} is a directory, not an image file")
    if not Path(path).is_file():
        raise CLIError(f"image file {path!r} does not exist")
    from .modeling.processing_phantom import to_rgb_array

    try:
        return to_rgb_array(path, name=f"image file {path!r}")
    except (ValueError, TypeError) as error:
        raise CLIError(str(error)) from error


def _check_device(device: str) -> str:
    """`device` when torch can place a tensor there, else a `CLIError`."""
    import torch

    try:
        torch.empty(0, device=device)
    except (RuntimeError, ValueError, AssertionError) as error:
        raise CLIError(f"--device {device!r} cannot be used: {_one_line(error)}") from error
    return device


def _run_chat(args: argparse.Namespace) -> int:
    if args.max_new_tokens < 1:
        raise CLIError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.question is not None and not args.question.strip():
        raise CLIError("--question is empty")
    image = _open_image(args.image)
    device = _check_device(args.device)
    model, processor = _load_model_and_processor(args.model, device)
    model.eval()
    from .answering import answer_question

    if args.question is not None:
        print(answer_question(model, processor, image, args.question, args.max_new_tokens))
        return 0
    print("Ask about the image; ':image PATH' changes it, ':quit' ends.", file=sys.stderr)
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        if line in (":quit", ":q", ":exit"):
            break
        try:  # a bad image or question is reported, and the session goes on
            if line.startswith(":image "):
                image = _open_image(line.split(" ", 1)[1].strip())
                continue
            print(answer_question(model, processor, image, line, args.max_new_tokens), flush=True)
        except (CLIError, ValueError, TypeError) as error:
            print(f"error: {_one_line(error)}", file=sys.stderr, flush=True)
    return 0


# ----------------------------------------------------------------------------------------------- eval


def _add_eval(subparsers: Any, selected: bool) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="evaluate a saved Phantom model on lmms-eval tasks with the published prompts",
        description="Run lmms-eval (pip install 'phantom-hf[eval]') on a saved or converted Phantom folder through "
        "its `phantom` model: the published per-benchmark prompts and answer lengths for the paper's benchmarks "
        "(scienceqa_img, ai2d, chartqa, seedbench, pope, hallusion_bench_image, mme, mathvista_testmini, "
        "mmbench_en_dev, mmbench_cn_dev, mmvet, llava_in_the_wild; mmvet, llava_in_the_wild and mathvista_testmini "
        "need OPENAI_API_KEY for their GPT judge). `phantom_synthetic` is the held-out split of `phantom-hf demo`. "
        "Prints the results table and, with --output, writes lmms-eval's JSON to OUTPUT/results.json.",
    )
    parser.add_argument("model", help="saved Phantom model folder (with config.json)")
    parser.add_argument("--tasks", required=True, help="comma-separated lmms-eval task names")
    parser.add_argument("--limit", type=float, default=None, help="at most this many documents per task (testing)")
    parser.add_argument("--output", default=None, help="folder for results.json")
    parser.add_argument("--batch-size", type=int, default=1, help="requests per forward/generate call (default 1)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16")
    parser.add_argument("--include-path", action="append", default=[], help="folder of extra task YAMLs (repeatable)")
    parser.add_argument("--prompts", choices=("published", "task"), default="published", help="whose prompts to use")
    parser.add_argument("--num-beams", type=int, default=None, help="beams on published benchmarks (default 3)")
    parser.add_argument("--synthetic-seed", type=int, default=0, help="`phantom_synthetic`: the demo's --seed")
    parser.add_argument(
        "--synthetic-budget", default="full", help="`phantom_synthetic`: the demo's --budget (full or quick)"
    )
    parser.set_defaults(handler=_run_eval)


def _run_eval(args: argparse.Namespace) -> int:
    if not (Path(args.model) / "config.json").is_file():
        raise CLIError(f"{args.model!r} is not a saved model folder (no config.json)")
    if importlib.util.find_spec("lmms_eval") is None:
        raise CLIError('lmms-eval is not installed: pip install "phantom-hf[eval]"')
    from .evaluation import results_table
    from .lmms_eval_phantom import run_lmms_eval

    limit = args.limit
    if limit is not None and limit >= 1:
        limit = int(limit)
    model_args: dict[str, Any] = {"prompts": args.prompts}
    if args.num_beams is not None:
        model_args["num_beams"] = args.num_beams
    results = run_lmms_eval(
        args.model,
        args.tasks.split(","),
        limit=limit,
        output=args.output,
        batch_size=args.batch_size,
        device=args.device,
        dtype=args.dtype,
        include_path=args.include_path,
        synthetic_seed=args.synthetic_seed,
        synthetic_budget=args.synthetic_budget,
        model_args=model_args,
    )
    print(results_table(results))
    if args.output:
        print(f"wrote {Path(args.output) / 'results.json'}")
    return 0


# ----------------------------------------------------------------------------------------------- card


def _add_card(subparsers: Any, selected: bool) -> None:
    parser = subparsers.add_parser(
        "card",
        help="render the model card (README.md) of a saved Phantom model folder",
        description="Render the model card of a saved Phantom folder from its config.json. Metadata of an "
        "existing README.md (base_model, datasets, license, tags) is kept unless a flag overrides it. Training "
        "hyper-parameters and evaluation results come from --info.",
    )
    parser.add_argument("folder", help="saved Phantom model folder (with config.json)")
    parser.add_argument("--repo-id", default=None, help="Hub id used in the card's code snippets")
    parser.add_argument("--model-name", default=None, help="title of the card")
    parser.add_argument("--base-model", default=None, help="Hub id of the model this one was fine-tuned from")
    parser.add_argument("--dataset", action="append", default=None, help="Hub id of a training dataset (repeatable)")
    parser.add_argument("--license", default=None, help="license id (default apache-2.0)")
    parser.add_argument("--tag", action="append", default=None, help="extra tag (repeatable)")
    parser.add_argument(
        "--info",
        default=None,
        help="YAML/JSON file with more card fields: description, training ({step: {param: value}}), "
        "training_data, eval_results ({metric: value}), ...",
    )
    parser.add_argument(
        "--eval-results",
        action="append",
        default=None,
        help="results.json written by `phantom-hf eval` (or lmms-eval): its numbers go into the card (repeatable)",
    )
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--write", action="store_true", help="write FOLDER/README.md instead of printing")
    output.add_argument("--output", default=None, help="write the card to this file instead of printing")
    parser.set_defaults(handler=_run_card)


def _run_card(args: argparse.Namespace) -> int:
    from huggingface_hub import ModelCard

    from .hub import CARD_NAME, render_model_card

    folder = Path(args.folder)
    _check_model_folder(folder)
    info: dict[str, Any] = {}
    existing = folder / CARD_NAME
    if existing.is_file():
        data = ModelCard.load(existing).data.to_dict()
        for key in ("base_model", "datasets", "license", "language", "model_name"):
            if data.get(key):
                info[key] = data[key]
        info["tags"] = data.get("tags") or []
    if args.info:
        info.update(_read_mapping(args.info, "card info"))
    if args.eval_results:
        from .evaluation import card_eval_results

        eval_results = dict(info.get("eval_results") or {})
        for path in args.eval_results:
            eval_results.update(card_eval_results(path))
        info["eval_results"] = eval_results
    flags = {
        "repo_id": args.repo_id,
        "model_name": args.model_name,
        "base_model": args.base_model,
        "datasets": args.dataset,
        "license": args.license,
    }
    info.update({key: value for key, value in flags.items() if value is not None})
    if args.tag:
        info["tags"] = list(info.get("tags") or []) + args.tag
    text = render_model_card(folder, **info)
    if args.write or args.output:
        target = existing if args.write else Path(args.output)
        target.write_text(text, encoding="utf-8")
        print(f"wrote {target}")
    else:
        sys.stdout.write(text)
    return 0


# ----------------------------------------------------------------------------------------------- push


def _add_push(subparsers: Any, selected: bool) -> None:
    parser = subparsers.add_parser(
        "push",
        help="upload a saved model folder to the Hugging Face Hub in one commit",
        description="Upload every file of a saved model folder to a Hub model repository, as one commit (the "
        "repository and branch are created when missing; a folder without README.md gets a rendered model card). "
        "Offline, without a token, or with the Hub unreachable it stops before uploading anything.",
    )
    parser.add_argument("folder", help="saved model folder (with config.json)")
    parser.add_argument("repo_id", help="target repository, namespace/name")
    parser.add_argument("--private", action="store_true", default=None, help="create the repository as private")
    parser.add_argument("--commit-message", default=None, help="commit message")
    parser.add_argument("--revision", default=None, help="branch to commit to (created if missing; default main)")
    parser.add_argument("--token", default=None, help="Hugging Face token (default: HF_TOKEN or the saved login)")
    parser.add_argument("--no-card", action="store_true", help="do not add a model card to a folder without README.md")
    if selected:
        from .hub import DEFAULT_HUB_TIMEOUT

        parser.add_argument(
            "--timeout",
            type=float,
            default=DEFAULT_HUB_TIMEOUT,
            help=f"seconds to wait for any answer of the Hub before giving up (default {DEFAULT_HUB_TIMEOUT:g})",
        )
    parser.add_argument(
        "--space",
        default=None,
        metavar="NAME",
        help="also push a Gradio Space serving the model's chat page (`phantom-hf app`) to NAME (namespace/name, or a "
        "name in the model's namespace); a private model needs a read token in the Space's HF_TOKEN secret",
    )
    parser.set_defaults(handler=_run_push)


def _run_push(args: argparse.Namespace) -> int:
    from .hub import check_repo_id, push_folder, push_space

    space_id = None
    if args.space is not None:  # checked before the model is pushed
        space_id = args.space if "/" in args.space else f"{args.repo_id.split('/')[0]}/{args.space}"
        check_repo_id(space_id, "--space")
    commit = push_folder(
        args.folder,
        args.repo_id,
        private=args.private,
        commit_message=args.commit_message,
        revision=args.revision,
        token=args.token,
        write_card=not args.no_card,
        timeout=args.timeout,
    )
    print(f"pushed {args.folder} to {getattr(commit, 'commit_url', None) or args.repo_id}")
    if space_id is not None:
        commit = push_space(
            space_id,
            args.repo_id,
            model_revision=args.revision,
            private=args.private,
            token=args.token,
            timeout=args.timeout,
        )
        print(f"pushed the Space {space_id}: {getattr(commit, 'commit_url', None) or space_id}")
    return 0


# ------------------------------------------------------------------------------------------------ app


def _add_app(subparsers: Any, selected: bool) -> None:
    parser = subparsers.add_parser(
        "app",
        help="serve a chat page (Gradio) for a saved Phantom model",
        description="Serve a Gradio chat page for a saved Phantom model (pip install 'phantom-hf[app]'): images "
        "and questions, multi-turn, streamed answers, generation settings, the published benchmark instructions.",
    )
    parser.add_argument("model", help="saved Phantom model folder or Hub id")
    parser.add_argument("--host", default=None, help="address to listen on (default 127.0.0.1, or GRADIO_SERVER_NAME)")
    parser.add_argument("--port", type=int, default=None, help="port (default 7860, or GRADIO_SERVER_PORT)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.set_defaults(handler=_run_app)


def _run_app(args: argparse.Namespace) -> int:
    if args.port is not None and not 0 < args.port < 65536:
        raise CLIError(f"--port must be between 1 and 65535, got {args.port}")
    if importlib.util.find_spec("gradio") is None:
        raise CLIError('Gradio is not installed: pip install "phantom-hf[app]"')
    model, processor = _load_model_and_processor(args.model, _check_device(args.device))
    from .app import launch

    launch(model, processor, host=args.host, port=args.port, title=Path(args.model).name)
    return 0


# ----------------------------------------------------------------------------------------------- main

_SUBCOMMANDS: dict[str, Callable[[Any, bool], None]] = {
    "demo": _add_demo,
    "convert": _add_convert,
    "train": _add_train,
    "chat": _add_chat,
    "eval": _add_eval,
    "card": _add_card,
    "push": _add_push,
    "app": _add_app,
}


def _selected_command(argv: Sequence[str] | None) -> str | None:
    """The sub-command named in `argv` (the first argument that is not an option), if any."""
    for argument in argv or ():
        if not argument.startswith("-"):
            return argument if argument in _SUBCOMMANDS else None
    return None


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The `phantom-hf` argument parser with every sub-command.

    A sub-command whose options live in its own module (demo, convert) gets them only when `argv` selects it, so
    that building the parser imports no sub-command module (and `phantom-hf --help` stays quick).
    """
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="phantom-hf",
        description="Phantom vision-language models (Phantom of Latent) on transformers and the Hugging Face Hub.",
    )
    parser.add_argument("--version", action="version", version=f"phantom-hf {__version__}")
    parser.add_argument(
        "--debug",
        "--traceback",
        dest="debug",
        action="store_true",
        help=f"show the full traceback of an error (or set {DEBUG_ENV}=1)",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    selected = _selected_command(argv)
    for name, add in _SUBCOMMANDS.items():
        add(subparsers, name == selected)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run `phantom-hf` with `argv` (default: the process arguments); returns the exit status.

    Every error (bad flags, missing or corrupt files, invalid values, upload refusals) prints one line
    `phantom-hf <command>: error: <message>` and returns 2; `--debug` (or PHANTOM_HF_DEBUG=1) shows the traceback
    instead. An interrupt (Ctrl-C) prints `phantom-hf <command>: interrupted` and raises `KeyboardInterrupt` on; the
    `phantom-hf` command then exits with status 130.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)
    args.argv = argv
    debug = args.debug or os.environ.get(DEBUG_ENV, "").strip() not in ("", "0")
    try:
        from . import register_auto_classes

        register_auto_classes()
        return args.handler(args)
    except KeyboardInterrupt:
        # Re-raised, not turned into a status: a caller running main() in its own process (a script, the test
        # suite) must stop too. The console script (phantom_hf_launch) exits with 130.
        print(f"phantom-hf {args.command}: interrupted", file=sys.stderr)
        raise
    except Exception as error:
        if debug:
            raise
        from .hub import HubUploadError

        hint = "" if isinstance(error, (CLIError, HubUploadError)) else f" (--debug or {DEBUG_ENV}=1 shows the traceback)"
        print(f"phantom-hf {args.command}: error: {_one_line(error)}{hint}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
