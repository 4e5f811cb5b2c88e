"""Stage 2 as a task for the one training loop: the encoder aligned with a decoder LLM through its
2x2-merge projector, next-token loss on the answers of FineCap-style conversations.

A micro-batch is one packed LLM row (data.llm.max_tokens tokens: several samples, each an image
block and its turns) and the row's images (data.max_tokens ViT patches). The loss is the mean
over every answer token of the data-parallel step: each micro-batch's summed token losses are
divided by the step's answer tokens over all DP ranks (counted in `start_step`, before any
forward), so a sample weighs by its answer tokens wherever it was packed, not by how full its
micro-batch happened to be (a mean of per-micro-batch means would be biased under packing).
"""

import logging
import os
from functools import partial
from typing import Optional

import torch
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region
from megatron.core.utils import unwrap_model

from finevit.config import Config
from finevit.config.stage2 import llm_tokenizer_dir
from finevit.data import PatchSpec, build_loader
from finevit.data.conversation import ConversationEncoder
from finevit.data.llm_tokenizer import LLMTokenizer, check_llm_tokenizer
from finevit.data.packing import PackedBatch
from finevit.eval import corpus_schemas
from finevit.eval.vlm import evaluate_vlm
from finevit.models.llm.packing import segments
from finevit.models.vlm import build_vlm, mrope_positions
from finevit.models.vlm.flops import vlm_train_flops
from finevit.parallel.dist import collective_device
from finevit.train.schedules import ResolvedPhase
from finevit.train.stage2_init import load_llm, load_vision, vision_source_problems
from finevit.train.task import TASKS

log = logging.getLogger("finevit.train")
IGNORE = -100


def next_token_targets(batch: PackedBatch) -> torch.Tensor:
    """[L] the token each position predicts, IGNORE off the answers. The loader labels each answer
    token itself (Hugging Face's convention); megatron's loss wants position i to carry token
    i + 1. No target crosses a sample's end."""
    targets = torch.full_like(batch.llm_labels, IGNORE)
    targets[:-1] = batch.llm_labels[1:]
    targets[batch.llm_cu_seqlens[1:].long() - 1] = IGNORE
    return targets


class Stage2Task:
    name = "stage2"
    towers = TASKS["stage2"].towers
    # logged per micro-batch -> step metric: the answer tokens the step's loss is averaged over
    step_metrics = {"answer_tokens": "answer_tokens"}
    step_rates = ("answer_tokens",)  # answer tokens trained on per second

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.pg = None
        self.tokenizer_path = llm_tokenizer_dir(cfg)
        self._tokenizer: Optional[LLMTokenizer] = None
        self._step_answer_tokens = 0.0  # over all DP ranks, set by start_step

    @property
    def tokenizer(self) -> LLMTokenizer:
        if self._tokenizer is None:
            self._tokenizer = LLMTokenizer(self.tokenizer_path)
        return self._tokenizer

    # ------------------------------------------------------------------ setup

    def preflight(self) -> list[str]:
        """Stage 2's input problems (after the common checks of train/preflight.py)."""
        cfg, out = self.cfg, []
        for corpus, schema in zip(cfg.data.corpora, corpus_schemas(cfg.data.corpora)):
            if schema == "classify":
                out.append(f"{corpus.path} is a labelled (classify) corpus: stage 2 trains on finecap "
                           "(and recaption) corpora")
        key = "data.llm.tokenizer" if cfg.data.llm.tokenizer else "model.llm.init_from (its tokenizer)"
        out += check_llm_tokenizer(self.tokenizer_path, cfg.model.llm.vocab_size, key)
        return out + vision_source_problems(cfg.model.vision, cfg.model.llm.hidden_size)

    def build(self, pg, parallel=None) -> list:
        """This rank's chunk; `parallel` overrides cfg.parallel (a canonical TP=1, PP=1 copy)."""
        if parallel is None:
            self.pg = pg
        p = parallel or self.cfg.parallel
        return [build_vlm(self.cfg.model, p, pg, dtype=self.cfg.precision.dtype,
                          first_stage_layers=p.first_stage_layers)]

    def init_weights(self, chunks: list, state) -> bool:
        """A run from scratch: the encoder from model.vision.init_from, the LLM from
        model.llm.init_from, when set (returns whether any weights were loaded)."""
        m, tp = self.cfg.model, self.pg.tp
        if m.vision.init_from:
            load_vision(chunks, m.vision, tp.rank(), tp.size())
        if m.llm.init_from:
            load_llm(chunks, m.llm, tp.rank(), tp.size())
        return bool(m.vision.init_from or m.llm.init_from)

    def build_loader(self, dp_rank: int, dp_size: int, data=None, epochs: Optional[int] = None):
        """Packed rows of conversations for one DP rank (`data`: another DataConfig, e.g. eval's)."""
        data = data or self.cfg.data
        spec = PatchSpec.from_vision(self.cfg.model.vision)
        encoder = ConversationEncoder(self.tokenizer, self.cfg.data.llm, spec.patch_size, spec.merge_unit)
        return build_loader(data, spec, dp_rank, dp_size, seed=self.cfg.precision.seed, epochs=epochs,
                            encoder=encoder)

    @property
    def seq_length(self) -> int:
        return self.cfg.data.llm.max_tokens  # one packed LLM row

    def batch_note(self, dp_size: int) -> str:
        d, m = self.cfg.data, self.cfg.schedule.micro_batches_per_step
        return (f"stage-2 batch: {m} packed row(s) of {d.llm.max_tokens} LLM tokens (at most {d.max_tokens} "
                f"ViT patches each) on each of {dp_size} data-parallel ranks; the loss is the mean over "
                "every answer token of the step")

    # ------------------------------------------------------------------ a step

    def start_step(self, batches: list) -> None:
        device = collective_device()
        n = sum(int((next_token_targets(b) != IGNORE).sum()) for b in batches)
        n = torch.tensor([float(n)], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(n, group=self.pg.dp)
        self._step_answer_tokens = float(n.item())

    def inputs(self, batch: PackedBatch) -> dict:
        """A packed row for forward(): ids, labels, sample bounds and M-RoPE positions."""
        if batch.llm_ids is None:
            raise ValueError("stage 2 needs conversations: build the loader with the task's encoder")
        ids, m = batch.llm_ids, self.cfg.model.vision.spatial_merge_size
        lengths = (batch.llm_cu_seqlens[1:] - batch.llm_cu_seqlens[:-1]).tolist()
        params = segments(lengths, len(ids))
        image_mask = ids == self.tokenizer.image_id
        merged = batch.grid_thw // torch.tensor([1, m, m])  # [n, 3] patches -> merged tokens
        targets = next_token_targets(batch)
        return {"pixel_values": batch.pixel_values, "grid_thw": batch.grid_thw, "vit_tokens": batch.max_tokens,
                "input_ids": ids.view(1, -1), "labels": targets.view(1, -1), "image_mask": image_mask,
                "position_ids": mrope_positions(image_mask, params.cu_seqlens, merged), "params": params}

    def forward(self, chunk, mb: dict, collect: Optional[list] = None):
        """megatron's forward_step. With `collect` (evaluation) the last stage appends (summed
        answer-token loss, answer tokens) of the row instead of a training loss."""
        model = unwrap_model(chunk)
        device = next(model.parameters()).device
        pixels = mb["pixel_values"].to(device, non_blocking=True) if model.pre_process else None
        labels, predict_at = mb["labels"].to(device), mb.get("predict_at")
        out = chunk(pixels, mb["grid_thw"], mb["input_ids"].to(device), mb["image_mask"],
                    mb["position_ids"].to(device), mb["params"], mb["vit_tokens"],
                    labels=None if predict_at is not None else labels.clamp(min=0))
        if predict_at is not None:
            return out, partial(self._greedy, predict_at=predict_at, collect=collect)

        def loss_func(token_losses):  # [1, s] per-token cross-entropy
            mask = labels != IGNORE
            local = (token_losses.float() * mask).sum()
            if collect is not None:
                collect.append((float(local), int(mask.sum())))
                return local * 0, {}
            micro, dp = self.cfg.schedule.micro_batches_per_step, self.pg.dp.size()
            total = max(self._step_answer_tokens, 1.0)
            # megatron divides by the micro-batch count and DDP averages over DP: undo both, so the
            # gradient is that of (sum over the step's answer tokens) / (their number).
            loss = local * (micro * dp / total)
            value = local.detach().clone()
            torch.distributed.all_reduce(value, group=self.pg.dp)  # every DP rank: the same value
            return loss, {"loss": value * micro / total,
                          "answer_tokens": torch.tensor(self._step_answer_tokens)}

        return out, loss_func

    def _greedy(self, logits, predict_at, collect: list):
        """Generation (eval/generate.py): the most likely next token after each position of
        `predict_at`, from the vocabulary-parallel logits [1, s, V / tp]."""
        rows = logits[0, predict_at.to(logits.device)]  # [n, V / tp]
        full = gather_from_tensor_model_parallel_region(rows.contiguous(), group=self.pg.tp)  # [n, V]
        collect.append(full.argmax(-1).cpu())
        return logits.sum() * 0, {}

    def counts(self, batch: PackedBatch) -> tuple[int, int, int, float]:
        """(images, LLM tokens, LLM token slots, model FLOPs of encoder + LLM)."""
        lengths = (batch.llm_cu_seqlens[1:] - batch.llm_cu_seqlens[:-1]).tolist()
        return (batch.num_images, batch.num_llm_tokens, len(batch.llm_ids),
                vlm_train_flops(self.cfg.model, batch.grid_thw, lengths))

    def enter_phase(self, phase: ResolvedPhase, chunks: list, optimizer, state) -> None:
        """A frozen encoder skips its backward (the loop has set its LR to 0 already)."""
        for chunk in chunks:
            vision = unwrap_model(chunk).vision
            if vision is not None:
                vision.frozen = "vision" in phase.freeze

    def evaluate(self, chunks: list, pg, phase: ResolvedPhase, step: Optional[int] = None) -> Optional[dict]:
        """Answer-token loss and generated answers (IoU, exact match, token F1) on eval.corpora;
        a few answers per task beside their references in <run>/eval/answers_step<N>.jsonl."""
        answers = None if step is None else os.path.join(self.cfg.logging.run_dir, "eval", f"answers_step{step:06d}.jsonl")
        return evaluate_vlm(self.cfg, self, chunks, pg, phase, answers_to=answers)

    def extra_metrics(self, chunks: list) -> dict:
        return {}
