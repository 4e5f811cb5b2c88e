"""Stage 1 as a task for the one training loop: what the model is, what a micro-batch feeds it,
what the loss is, and what a schedule phase changes.

The contrastive batch is one micro-batch across all data-parallel ranks: every DP rank's packed
micro-batch i is scored against every other rank's micro-batch i (and nothing else). With
micro_batches_per_step > 1 (gradient accumulation or pipeline micro-batches) a step averages the
losses of that many separate contrastive groups; config validation says so when it applies.
"""

import logging
from typing import Optional

import torch
from megatron.core.utils import unwrap_model

from finevit.config import Config
from finevit.convert.siglip_text import ConversionError, check_hf_text_dir, load_hf_text, read_hf_text_dir
from finevit.data import PatchSpec, build_loader
from finevit.data.packing import PackedBatch
from finevit.data.tokenizer import check_tokenizer
from finevit.eval import corpus_schemas, evaluate
from finevit.models.siglip import build_siglip
from finevit.models.vision.flops import encoder_train_flops
from finevit.train.optim import reload_main_params
from finevit.train.schedules import ResolvedPhase
from finevit.train.task import TASKS

log = logging.getLogger("finevit.train")


def text_train_flops(text, n: int, length: int, embed_dim: int) -> int:
    d, f = text.hidden_size, text.ffn_hidden_size
    per_token = text.num_layers * (2 * 4 * d * d + 2 * 2 * d * f + 4 * length * d)
    return 3 * (n * length * per_token + 2 * n * d * embed_dim)


class Stage1Task:
    name = "stage1"
    towers = TASKS["stage1"].towers
    # Values the loss function logs per micro-batch -> step metric (mean over a step's groups):
    # the contrastive batch, i.e. the pairs of one micro-batch across all data-parallel ranks.
    step_metrics = {"pairs": "contrastive_batch"}
    step_rates = ()

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.max_tokens = cfg.data.max_tokens
        self.text_len = cfg.data.max_text_len  # the phase's text length (pad target for "last")
        self.pg = None
        self.hf_positions = None  # position rows of model.text.init_from's tower (preflight reads it)

    def build(self, pg, parallel=None) -> list:
        """This rank's chunks; `parallel` overrides cfg.parallel (a canonical TP=1, PP=1 copy)."""
        if parallel is None:
            self.pg = pg  # the groups the loss reduces over
        return build_siglip(self.cfg.model, parallel or self.cfg.parallel, pg, dtype=self.cfg.precision.dtype)

    def preflight(self) -> list[str]:
        """Stage 1's own input problems (after the common checks of train/preflight.py), one
        sentence each."""
        out = []
        for corpus, schema in zip(self.cfg.data.corpora, corpus_schemas(self.cfg.data.corpora)):
            if schema == "classify":
                out.append(f"{corpus.path} is a labelled (classify) corpus, which has no captions "
                           f"to train on: name it under eval.corpora")
        tokenizer, vocab = self.cfg.data.tokenizer, self.cfg.model.text.vocab_size
        if not tokenizer:
            out.append("data.tokenizer is not set: stage 1 tokenises captions (and class prompts) with "
                       "a sentencepiece model (data_tools/train_tokenizer.py trains one)")
        elif (pieces := check_tokenizer(tokenizer)) > vocab:
            out.append(f"data.tokenizer={tokenizer} has {pieces} pieces but "
                       f"model.text.vocab_size={vocab}: set model.text.vocab_size to at least that")
        text = self.cfg.model.text
        if text.init_from:
            try:
                self.hf_positions = check_hf_text_dir(text.init_from, text, self.cfg.model.contrastive.embed_dim)
            except ConversionError as e:
                out.append(str(e))
        return out

    def init_weights(self, chunks: list, state) -> bool:
        """A run from scratch: the text tower from model.text.init_from when set (returns whether
        weights were loaded). Its Q position rows count as trained (a longer phase stretches them)."""
        path = self.cfg.model.text.init_from
        if not path:
            return False
        hf_state = read_hf_text_dir(path) if any(unwrap_model(c).text is not None for c in chunks) else {}
        for chunk in chunks:
            if unwrap_model(chunk).text is not None:
                load_hf_text(unwrap_model(chunk).text, hf_state)
        state.task["text_positions"] = self.hf_positions  # on every rank, text tower or not
        log.info("text tower initialised from %s (%d position rows)", path, self.hf_positions)
        return True

    def batch_note(self, dp_size: int) -> str:
        """What the contrastive batch is, logged at the start of a run."""
        m, tokens = self.cfg.schedule.micro_batches_per_step, self.max_tokens
        groups = "one contrastive group per step" if m == 1 else f"{m} separate contrastive groups per step"
        return (f"contrastive batch: one packed micro-batch ({tokens} tokens) on each of {dp_size} "
                f"data-parallel ranks, every image scored against the captions of all {dp_size}; "
                f"{groups} (logged as contrastive_batch pairs and contrastive_groups)")

    def build_loader(self, dp_rank: int, dp_size: int):
        return build_loader(self.cfg.data, PatchSpec.from_vision(self.cfg.model.vision), dp_rank, dp_size,
                            seed=self.cfg.precision.seed)

    @property
    def seq_length(self) -> int:
        return self.cfg.data.max_tokens  # packed patches

    # ------------------------------------------------------------------ a step

    def start_step(self, batches: list) -> None:
        pass  # the contrastive loss is complete within each micro-batch group


    def inputs(self, batch: PackedBatch, captions: bool = True) -> dict:
        """A micro-batch for forward(); captions=False (evaluating labelled images) embeds the
        images alone."""
        if captions and batch.text_ids is None:
            raise ValueError("stage 1 needs tokenised captions: set data.tokenizer to a sentencepiece "
                             "model and train on captioned corpora (classify corpora are for eval)")
        return {"pixel_values": batch.pixel_values, "grid_thw": batch.grid_thw,
                "cu_seqlens": batch.cu_seqlens, "text_ids": batch.text_ids,
                "text_lengths": batch.text_lengths}

    def forward(self, chunk, mb: dict, collect: Optional[list] = None):
        """megatron's forward_step: output, and the loss function for the last stage.

        With `collect` (evaluation), the last stage appends (image_emb, text_emb or None) instead
        of computing the contrastive loss.
        """
        device = next(unwrap_model(chunk).parameters()).device
        pixels = mb["pixel_values"].to(device, non_blocking=True) if unwrap_model(chunk).pre_process else None
        out = chunk(pixels, mb["grid_thw"], mb["cu_seqlens"], self.max_tokens, mb["text_ids"],
                    mb["text_lengths"], self.text_len)

        def loss_func(output):
            images, texts = output
            if collect is not None:
                collect.append((images.detach().float().cpu(),
                                None if texts is None else texts.detach().float().cpu()))
                return images.sum() * 0, {}
            res = unwrap_model(chunk).loss(images, texts, group=self.pg.dp)
            # clone: megatron divides the returned loss by the number of micro-batches in place
            return res.loss, {"loss": res.value.detach().clone(),
                              "pairs": torch.tensor(float(res.num_pairs))}

        return out, loss_func

    def counts(self, batch: PackedBatch) -> tuple[int, int, int, float]:
        """(images, patches, patch slots, model FLOPs of both towers)."""
        m = self.cfg.model
        text = text_train_flops(m.text, batch.num_images, self.text_len, m.contrastive.embed_dim)
        return batch.num_images, batch.num_tokens, batch.max_tokens, encoder_train_flops(m.vision, batch.grid_thw) + text

    def evaluate(self, chunks: list, pg, phase: ResolvedPhase, step: Optional[int] = None) -> Optional[dict]:
        """Zero-shot retrieval and classification on eval.corpora."""
        return evaluate(self.cfg, self, chunks, pg, phase)

    # ------------------------------------------------------------------ phases

    def enter_phase(self, phase: ResolvedPhase, chunks: list, optimizer, state) -> None:
        """The phase's text length and frozen text tower in the model; a longer text than trained
        stretches the trained position rows over it (state.task["text_positions"])."""
        self.text_len = phase.max_text_len
        for chunk in chunks:
            unwrap_model(chunk).text_frozen = "text" in phase.freeze
        trained = state.task.get("text_positions", 0)
        if trained == 0:  # a fresh run: the first phase's rows are the trained ones
            state.task["text_positions"] = phase.max_text_len
        elif phase.max_text_len > trained:
            tables = []
            for chunk in chunks:
                if unwrap_model(chunk).text is not None:
                    unwrap_model(chunk).text.extend_positions(trained, phase.max_text_len)
                    tables.append(unwrap_model(chunk).text.position_embeddings.weight)
            reload_main_params(optimizer, tables)  # the fp32 main copy must follow the stretched rows
            state.task["text_positions"] = phase.max_text_len

    def extra_metrics(self, chunks: list) -> dict:
        """The loss's temperature and bias (on the last stage, where the loss lives), and how many
        separate contrastive groups a step averages (one per micro-batch)."""
        loss = unwrap_model(chunks[-1]).loss
        if loss is None:
            return {}
        out = {"contrastive_groups": self.cfg.schedule.micro_batches_per_step,
               "temperature": float(loss.logit_scale.detach().exp())}
        if loss.logit_bias is not None:
            out["bias"] = float(loss.logit_bias.detach())
        return out
