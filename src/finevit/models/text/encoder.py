"""The text tower: SigLIP / SigLIP2's text encoder on megatron-core blocks.

token + learned position embeddings -> pre-LN transformer layers -> final LayerNorm -> one
hidden state per text (pooling) -> linear head to the shared embedding width.

Input is a batch of texts `text_ids [n, L]`, padded to a common length L <= max_positions; inside
the block the layout is megatron's [s=L, b=n, h]. Pooling (TextConfig.pooling):
* "last": the state at position L-1 of the padded text, with no attention mask. That is what
  SigLIP does (texts padded to the training length, 64), so an imported tower is exact, but only
  when texts are padded to the same length as in training: see `pad_to_length`.
* "eos": the state at position length-1 of each text (its end-of-text token), with padding keys
  masked out of attention, so the output is independent of padding content and padded length.

Tensor parallelism splits the vocabulary (VocabParallelEmbedding), heads and MLP through the
process groups passed in. The tower has no pipeline parallelism: stage 1 puts it whole on the
last pipeline stage, beside the loss, so it is always built with pre_process and post_process.
"""

import torch
import torch.nn.functional as F
from megatron.core.enums import ModelType
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel import VocabParallelEmbedding
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_block import TransformerBlock, TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig

from finevit.config import TextConfig


def pad_to_length(text_ids: torch.Tensor, length: int, pad_id: int) -> torch.Tensor:
    """[n, L] -> [n, length], right-padded with pad_id. "last" pooling reads position length-1,
    so a batch padded only to its longest text must be padded on to the phase's text length."""
    if text_ids.shape[1] > length:
        raise ValueError(f"texts of {text_ids.shape[1]} tokens do not fit in {length}")
    return F.pad(text_ids, (0, length - text_ids.shape[1]), value=pad_id)


class TextEncoder(MegatronModule):
    # Read by megatron's schedules and finalize_model_grads: nothing is tied to another stage.
    model_type = ModelType.encoder_or_decoder
    share_embeddings_and_output_weights = False

    def __init__(self, config: TransformerConfig, text: TextConfig, embed_dim: int,
                 spec: TransformerBlockSubmodules, pg_collection: ProcessGroupCollection):
        super().__init__(config=config)
        if text.pooling not in ("last", "eos"):
            raise ValueError(f"unknown text pooling {text.pooling!r} (expected 'last' or 'eos')")
        self.text, self.embed_dim, self.pg_collection = text, embed_dim, pg_collection
        self.word_embeddings = VocabParallelEmbedding(
            text.vocab_size, text.hidden_size, init_method=config.init_method, config=config,
            tp_group=pg_collection.tp)
        # A fixed-shape table of max_positions rows, replicated over TP; shorter texts use the
        # first rows (see extend_positions for how a phase moves to longer texts).
        self.position_embeddings = torch.nn.Embedding(text.max_positions, text.hidden_size,
                                                      dtype=config.params_dtype)
        config.init_method(self.position_embeddings.weight)
        self.decoder = TransformerBlock(config, spec, post_layer_norm=True, pre_process=True,
                                        post_process=True, pg_collection=pg_collection)
        # Replicated over TP: it sees one pooled row per text, too little to be worth splitting.
        self.head = torch.nn.Linear(text.hidden_size, embed_dim, dtype=config.params_dtype)
        config.init_method(self.head.weight)
        torch.nn.init.zeros_(self.head.bias)

    def padding_mask(self, lengths: torch.Tensor, seq_len: int) -> torch.Tensor:
        """[n] -> [n, 1, 1, L] bool, True at padding keys (megatron's convention)."""
        positions = torch.arange(seq_len, device=lengths.device)
        return (positions[None, :] >= lengths[:, None])[:, None, None, :]

    def forward(self, text_ids: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """text_ids [n, L] int64 (L <= max_positions); lengths [n], required for "eos" pooling
        (each >= 1), ignored for "last". Returns [n, embed_dim]."""
        n, seq_len = text_ids.shape
        if seq_len > self.text.max_positions:
            raise ValueError(f"texts of {seq_len} tokens exceed max_positions="
                             f"{self.text.max_positions}")
        device = self.position_embeddings.weight.device
        text_ids = text_ids.to(device)
        hidden = self.word_embeddings(text_ids) + self.position_embeddings.weight[:seq_len]
        hidden = hidden.transpose(0, 1).contiguous()  # [n, L, h] -> [L, n, h], megatron's layout
        rows = torch.arange(n, device=device)
        if self.text.pooling == "eos":
            if lengths is None:
                raise ValueError('"eos" pooling needs the text lengths')
            lengths = lengths.to(device)
            out = self.decoder(hidden, attention_mask=self.padding_mask(lengths, seq_len))
            pooled = out[lengths - 1, rows]  # [L, n, h] -> [n, h]
        else:
            out = self.decoder(hidden, attention_mask=None)
            pooled = out[-1]  # [L, n, h] -> [n, h], SigLIP's last_hidden_state[:, -1]
        return self.head(pooled)

    @torch.no_grad()
    def extend_positions(self, old_len: int, new_len: int) -> None:
        """Stretch the trained rows [0:old_len] of the position table over [0:new_len] by linear
        interpolation (first and last rows kept, as align_corners=True), in place.

        Used when a phase lengthens the texts (64 -> 256): the learned positions keep their
        relative meaning instead of leaving rows old_len.. untrained. The table keeps its shape
        (max_positions rows), so optimizer state and distributed checkpoints stay valid. With
        mixed precision the optimizer holds fp32 main copies: call this before the optimizer is
        built, or reload the table's afterwards (`finevit.train.optim.reload_main_params`).
        """
        if not 1 <= old_len <= new_len <= self.text.max_positions:
            raise ValueError(f"cannot stretch {old_len} positions over {new_len} "
                             f"(max_positions={self.text.max_positions})")
        table = self.position_embeddings.weight
        old = table[:old_len].float().t().unsqueeze(0)  # [old, h] -> [1, h, old]: channels first
        new = F.interpolate(old, size=new_len, mode="linear", align_corners=True)
        table[:new_len] = new[0].t().to(table.dtype)  # [1, h, new] -> [new, h]
