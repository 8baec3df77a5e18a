"""Upload a saved Phantom model folder to the Hugging Face Hub.

Two ways:

* `phantom_hf.hub.push_folder(folder, repo_id, private=..., commit_message=..., revision=...)` (default,
  `--via push_folder`, also `phantom-hf push FOLDER REPO_ID`): every file of the folder in ONE commit (weights,
  config, remote code, processor, chat template, model card). It checks first that the Hub is reachable with
  a token and raises `phantom_hf.hub.HubUploadError` before sending anything otherwise; a failed upload makes
  no commit.
* `model.push_to_hub(repo_id)` + `processor.push_to_hub(repo_id)` (`--via push_to_hub`): the transformers
  way; it uploads the same kind of files, but in two commits.

Without `--folder` a tiny random model is saved to a temp folder first. `--dry-run` prints the exact files
that would be uploaded and sends nothing. Offline (this script sets HF_HUB_OFFLINE=1 unless you set it) the
upload fails fast with a clear message and a non-zero exit status. To really upload, log in
(`hf auth login` or HF_TOKEN) and run, with YOUR namespace:

    HF_HUB_OFFLINE=0 python examples/push_to_hub.py --folder phantom-demo --repo-id your-name/phantom-tiny --private
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import torch  # noqa: E402
from huggingface_hub.errors import HfHubHTTPError  # noqa: E402
from transformers import AutoModelForImageTextToText, AutoProcessor  # noqa: E402

from phantom_hf import PhantomForConditionalGeneration, PhantomProcessor  # noqa: E402
from phantom_hf.hub import CARD_NAME, HubUploadError, folder_files, push_folder  # noqa: E402
from phantom_hf.synthetic import vocabulary  # noqa: E402
from phantom_hf.tiny import tiny_phantom_config  # noqa: E402
from phantom_hf.tokenization import build_tokenizer  # noqa: E402


def save_tiny(folder: Path) -> None:
    """A tiny random Phantom model and its processor, saved with `save_pretrained` (no model card: `push_folder`
    renders one into the folder before uploading)."""
    tokenizer = build_tokenizer(vocabulary())
    config = tiny_phantom_config(
        image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"), text_config={"vocab_size": len(tokenizer)}
    )
    torch.manual_seed(0)
    PhantomForConditionalGeneration(config).save_pretrained(folder)
    PhantomProcessor.from_config(config, tokenizer).save_pretrained(folder)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", default=None, help="saved model folder (default: a tiny model in a temp folder)")
    parser.add_argument("--repo-id", default="your-name/phantom-tiny", help="target Hub repository, namespace/name")
    parser.add_argument("--via", choices=["push_folder", "push_to_hub"], default="push_folder")
    parser.add_argument("--private", action="store_true", default=None, help="create the repository as private")
    parser.add_argument("--revision", default=None, help="branch to commit to (push_folder creates it if missing)")
    parser.add_argument("--commit-message", default=None)
    parser.add_argument("--token", default=None, help="Hugging Face token (default: HF_TOKEN or the saved login)")
    parser.add_argument("--dry-run", action="store_true", help="print the files that would be uploaded, send nothing")
    args = parser.parse_args()

    scratch = tempfile.TemporaryDirectory() if args.folder is None else None
    folder = Path(args.folder or scratch.name)
    if args.folder is None:
        save_tiny(folder)
        print(f"saved a tiny Phantom model to {folder}")
    try:
        if args.dry_run:
            files = folder_files(folder)  # exactly what push_folder puts in its commit
            print(f"dry run: {len(files)} files of {folder} would be uploaded to {args.repo_id}:")
            for name in files:
                print(f"  upload: {name} ({(folder / name).stat().st_size} bytes)")
            if CARD_NAME not in files:
                print(f"  upload: {CARD_NAME} (no card yet: push_folder renders one first)")
            return 0
        if args.via == "push_folder":
            commit = push_folder(
                folder,
                args.repo_id,
                private=args.private,
                commit_message=args.commit_message,
                revision=args.revision,
                token=args.token,
            )
            print(f"pushed {folder} to {commit.commit_url}")
        else:
            model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True)
            processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
            options = dict(
                private=args.private, commit_message=args.commit_message, revision=args.revision, token=args.token
            )
            model.push_to_hub(args.repo_id, **options)
            processor.push_to_hub(args.repo_id, **options)
            print(f"pushed the model and processor of {folder} to {args.repo_id}")
        return 0
    except (HubUploadError, HfHubHTTPError, OSError) as error:
        print(f"push to {args.repo_id} failed: {error}", file=sys.stderr)
        return 1
    finally:
        if scratch is not None:
            scratch.cleanup()


if __name__ == "__main__":
    sys.exit(main())
