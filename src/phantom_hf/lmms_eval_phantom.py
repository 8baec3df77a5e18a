"""The `phantom` model of lmms-eval: a saved or converted Phantom folder, asked with the published prompts.

`pip install "phantom-hf[eval]"` registers it through lmms-eval's entry-point group `lmms_eval.models`
(`phantom_hf.lmms_eval_plugin`), so that

    lmms-eval --model phantom --model_args pretrained=FOLDER,dtype=bfloat16 --tasks mme,pope --batch_size 8

runs the folder (`run_lmms_eval` runs it from Python, as `phantom-hf eval` does). For the tasks of the paper's Tables 1-2 (`phantom_hf.evaluation.LMMS_TASKS`) lmms-eval's own
instruction is replaced by the published one and the answer gets the published length and beam search
(`phantom_hf.prompts`); other tasks are asked as lmms-eval writes them (`prompts=task` does that for every task).
The user turn is written by the folder's own chat template (`PhantomProcessor.user_prompt`), images are given to
the processor as one list per prompt (never `videos`/`audios`), and requests are batched (left padding for
generation, right padding for log-likelihoods).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from lmms_eval.api.instance import GenerationResult, Instance
from lmms_eval.api.model import lmms

from .answering import answer_questions, model_inputs, pad_token_id, question_prompt
from .evaluation import SYNTHETIC_TASK, LmmsTask, lmms_task, parse_task_map, published_question, write_synthetic_task
from .prompts import PUBLISHED_GENERATION, benchmark_prompt

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
DEFAULT_MAX_NEW_TOKENS = 128


def _flatten_visuals(visuals: Any) -> list[Any]:
    if visuals is None:
        return []
    if not isinstance(visuals, (list, tuple)):
        return [visuals]
    flat = []
    for item in visuals:
        flat.extend(_flatten_visuals(item) if isinstance(item, (list, tuple)) else [item])
    return flat


class PhantomLMMS(lmms):
    """lmms-eval model wrapper of `PhantomForConditionalGeneration` + `PhantomProcessor`.

    Args (lmms-eval's `--model_args`):
        pretrained: a folder written by `save_pretrained` or `phantom-hf convert` (or a Hub id).
        device: torch device (default: cuda when available, else cpu).
        dtype: "auto" (bfloat16 on a GPU, float32 on a CPU), "float32", "bfloat16", "float16".
        batch_size: requests per forward/generate call.
        prompts: "published" (default) or "task" (lmms-eval's prompts and decoding for every task).
        num_beams: beams for the published benchmarks (default 3, the published evaluation's).
        task_map: extra `task:benchmark|task:benchmark` pairs, for local tasks that stand for a published benchmark.
    """

    is_simple = True

    def __init__(
        self,
        pretrained: str,
        device: str | None = None,
        dtype: str | torch.dtype = "auto",
        batch_size: int | str = 1,
        prompts: str = "published",
        num_beams: int | str = PUBLISHED_GENERATION["num_beams"],
        task_map: str | dict[str, str | LmmsTask] | None = None,
        attn_implementation: str | None = None,
        **unused: Any,
    ) -> None:
        super().__init__()
        from transformers import AutoModelForImageTextToText, AutoProcessor

        import phantom_hf  # noqa: F401  registers Phantom with the Auto classes

        unknown = sorted(key for key, value in unused.items() if value is not None and key != "max_batch_size")
        if unknown:
            raise TypeError(f"phantom: unknown model_args {unknown}")
        if prompts not in ("published", "task"):
            raise ValueError(f"prompts must be 'published' or 'task', got {prompts!r}")
        self.batch_size_per_gpu = int(batch_size)
        if self.batch_size_per_gpu < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
        self.num_beams = int(num_beams)
        self.prompts = prompts
        self.task_map = parse_task_map(task_map)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self._device = torch.device(device)
        if isinstance(dtype, str):
            if dtype == "auto":
                dtype = torch.bfloat16 if self._device.type == "cuda" else torch.float32
            elif dtype not in _DTYPES:
                raise ValueError(f"dtype must be 'auto' or one of {sorted(_DTYPES)}, got {dtype!r}")
            else:
                dtype = _DTYPES[dtype]
        extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
        self.model = AutoModelForImageTextToText.from_pretrained(pretrained, trust_remote_code=True, dtype=dtype, **extra)
        self.model.to(self._device).eval()
        self.processor = AutoProcessor.from_pretrained(pretrained, trust_remote_code=True)
        self.tokenizer = self.processor.tokenizer

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self) -> torch.device:
        return self._device

    # ----------------------------------------------------------------------------------- prompts

    def benchmark_of(self, task: str) -> LmmsTask | None:
        """The published benchmark lmms-eval task `task` stands for (None: asked as lmms-eval writes it)."""
        return None if self.prompts == "task" else lmms_task(task, self.task_map)

    def question(self, context: str, task: str) -> str:
        """The question a generation request asks: the published question for a published benchmark, else
        lmms-eval's `context` as it is (the user turn around it: `answering.question_prompt`)."""
        mapped = self.benchmark_of(task)
        return published_question(context, mapped) if mapped is not None else context

    def _visuals(self, doc_to_visual: Any, doc_id: Any, task: str, split: str) -> list[Any]:
        if doc_to_visual is None:
            return []
        return _flatten_visuals(doc_to_visual(self.task_dict[task][split][doc_id]))

    # -------------------------------------------------------------------------------- generation

    def _generation_settings(self, task: str, gen_kwargs: dict[str, Any]) -> tuple[int, int, bool, float | None, tuple[str, ...]]:
        until = gen_kwargs.get("until") or ()
        until = (until,) if isinstance(until, str) else tuple(until)
        mapped = self.benchmark_of(task)
        if mapped is not None:
            return benchmark_prompt(mapped.benchmark).max_new_tokens, self.num_beams, False, None, until
        temperature = float(gen_kwargs.get("temperature") or 0.0)
        do_sample = bool(gen_kwargs.get("do_sample")) and temperature > 0
        max_new_tokens = int(gen_kwargs.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS)
        return max_new_tokens, int(gen_kwargs.get("num_beams") or 1), do_sample, temperature if do_sample else None, until

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Answers to generation requests, batched by task and decoding settings, in the requests' order."""
        prepared = []
        for index, request in enumerate(requests):
            context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
            settings = self._generation_settings(task, dict(gen_kwargs or {}))
            visuals = self._visuals(doc_to_visual, doc_id, task, split)
            prepared.append((settings, index, self.question(context, task), visuals))
        prepared.sort(key=lambda item: (repr(item[0]), item[1]))
        answers: list[str] = [""] * len(requests)
        start = 0
        while start < len(prepared):
            settings = prepared[start][0]
            end = start
            while end < len(prepared) and end - start < self.batch_size and prepared[end][0] == settings:
                end += 1
            chunk = prepared[start:end]
            start = end
            max_new_tokens, num_beams, do_sample, temperature, until = settings
            options: dict[str, Any] = {"max_new_tokens": max_new_tokens, "num_beams": num_beams, "do_sample": do_sample}
            if do_sample:
                options["temperature"] = temperature
            texts = answer_questions(self.model, self.processor, [item[2] for item in chunk], [item[3] for item in chunk], **options)
            for (_, index, _, _), text in zip(chunk, texts):
                for stop in until:
                    if stop and stop in text:
                        text = text.split(stop, 1)[0]
                answers[index] = text.strip()
        return answers

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError("phantom: multi-round generation tasks are not supported")

    # ---------------------------------------------------------------------------- log-likelihood

    def loglikelihood(self, requests: list[Instance]) -> list[GenerationResult]:
        """Per request, `(-log p(continuation | context), whether greedy decoding writes the continuation)`: the
        prompt is lmms-eval's context in the chat template, the continuation follows the generation header.

        Two conventions of lmms-eval 0.7.3 shape the result. Its multiple-choice scoring picks the choice with the
        smallest value (`np.argmin`, "we return the actual loss"), so the value is the continuation's negative
        log-likelihood (summed over its tokens, as lm-evaluation-harness sums log-probabilities). And its evaluator
        turns every model output that is not a string or a `GenerationResult` into `str(output)`, which breaks a
        plain `(float, bool)` pair, so each pair travels as the `text` of a `GenerationResult`, which it unwraps
        unchanged (`lmms_eval.api.instance.unwrap_generation_output`)."""
        results: list[GenerationResult] = []
        for start in range(0, len(requests), self.batch_size):
            for value, greedy in self._loglikelihood_batch(requests[start : start + self.batch_size]):
                results.append(GenerationResult(text=(value, greedy)))  # type: ignore[arg-type]
        return results

    def _loglikelihood_batch(self, requests: Sequence[Instance]) -> list[tuple[float, bool]]:
        rows, pixel_values, num_patches = [], [], []
        for request in requests:
            context, continuation, doc_to_visual, doc_id, task, split = request.args
            if not isinstance(continuation, str):
                continuation = continuation(self.task_dict[task][split][doc_id])
            visuals = self._visuals(doc_to_visual, doc_id, task, split)
            encoded = model_inputs(self.model, self.processor, [question_prompt(self.processor, context, len(visuals))], [visuals])
            target = self.tokenizer(continuation, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
            if target.numel() == 0:
                raise ValueError(f"phantom: the continuation {continuation!r} of task {task!r} has no tokens")
            rows.append((encoded["input_ids"][0], target.to(self._device)))
            if "pixel_values" in encoded:
                pixel_values.append(encoded["pixel_values"])
                num_patches.append(encoded["num_patches"].reshape(-1))
        length = max(len(prompt) + len(target) for prompt, target in rows)
        pad_id = pad_token_id(self.tokenizer) or 0  # right padding, masked: any id does
        input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long, device=self._device)
        attention_mask = torch.zeros_like(input_ids)
        for row, (prompt, target) in enumerate(rows):  # right padding: every row starts with its anchor token
            sequence = torch.cat([prompt, target])
            input_ids[row, : len(sequence)] = sequence
            attention_mask[row, : len(sequence)] = 1
        inputs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
        if pixel_values:
            inputs["pixel_values"] = torch.cat(pixel_values)
            inputs["num_patches"] = torch.cat(num_patches)
        with torch.inference_mode():
            logits = self.model(**inputs).logits
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()
        results = []
        for row, (prompt, target) in enumerate(rows):
            positions = torch.arange(len(prompt) - 1, len(prompt) + len(target) - 1, device=self._device)
            log_probs = torch.log_softmax(logits[row, positions], dim=-1)
            negative_log_likelihood = -log_probs.gather(1, target[:, None]).sum().item()
            greedy = bool((log_probs.argmax(dim=-1) == target).all())
            results.append((negative_log_likelihood, greedy))
        return results


# --------------------------------------------------------------------------------- runner


def run_lmms_eval(
    folder: str | Path,
    tasks: Sequence[str],
    limit: int | float | None = None,
    output: str | Path | None = None,
    batch_size: int = 1,
    device: str | None = None,
    dtype: str = "auto",
    include_path: Sequence[str | Path] = (),
    synthetic_seed: int = 0,
    synthetic_budget: str = "full",
    model_args: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Evaluate the Phantom model in `folder` on lmms-eval `tasks` with the published prompts; returns
    lmms-eval's result dict and, with `output`, writes it to `output/results.json`. `phantom_synthetic` among the
    tasks is the demo's held-out split (`write_synthetic_task`, written under `output` or a temporary folder)."""
    import tempfile

    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    tasks = [task.strip() for task in tasks if task.strip()]
    if not tasks:
        raise ValueError("no tasks given")
    if not (Path(folder) / "config.json").is_file():
        raise FileNotFoundError(f"{str(folder)!r} is not a saved model folder (no config.json)")
    paths = [str(path) for path in include_path]
    with tempfile.TemporaryDirectory() as scratch:
        if SYNTHETIC_TASK in tasks:
            base = Path(output) if output is not None else Path(scratch)
            paths.append(str(write_synthetic_task(base / "synthetic_task", synthetic_seed, synthetic_budget)))
        model = PhantomLMMS(pretrained=str(folder), device=device, dtype=dtype, batch_size=batch_size, **dict(model_args or {}))
        manager = TaskManager(include_path=paths or None, model_name="phantom")
        results = simple_evaluate(
            model=model, tasks=tasks, limit=limit, task_manager=manager, bootstrap_iters=0, log_samples=True
        )
    if results is None:
        raise RuntimeError("lmms-eval returned no results")
    if output is not None:
        out = Path(output)
        out.mkdir(parents=True, exist_ok=True)
        samples = results.pop("samples", None)
        (out / "results.json").write_text(json.dumps(results, indent=2, default=str, ensure_ascii=False), encoding="utf-8")
        if samples is not None:
            results["samples"] = samples
    return results


__all__ = ["PhantomLMMS", "run_lmms_eval"]
