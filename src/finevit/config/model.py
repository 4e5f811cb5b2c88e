"""Model configuration: the architecture of each tower, independent of how it is parallelised."""

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class VisionConfig:
    """A Qwen2.5-VL-style native-resolution ViT (defaults: finevit-0.9b)."""

    num_layers: int = 28
    hidden_size: int = 1536
    num_heads: int = 16
    ffn_hidden_size: int = 4608  # SwiGLU inner width
    patch_size: int = 14
    # Qwen2.5-VL embeds 2-frame "tubelets"; a still image is its frame repeated. Keeping 2 makes the
    # converted checkpoint a drop-in; 1 halves the patch-embedding input for image-only training.
    temporal_patch_size: int = 2
    in_channels: int = 3
    spatial_merge_size: int = 2  # 2x2 patches are grouped for the merger (and kept adjacent in token order)
    norm_eps: float = 1e-6
    qkv_bias: bool = True
    linear_bias: bool = True  # projection and MLP biases, as in Qwen2.5-VL
    rope_theta: float = 10000.0
    # Window attention: layers listed here attend within window_size x window_size pixel windows;
    # every other layer attends over the whole image. Empty = full attention everywhere.
    window_layers: list[int] = field(default_factory=list)
    window_size: int = 112
    merger: bool = True  # 2x2 patch merger head (RMSNorm + 2-layer MLP), the LLM-facing output
    out_hidden_size: int = 1536  # merger output width (the LLM's hidden size in stage 2)
    init_std: float = 0.02
    # Stage 2: where the encoder starts. A finevit stage-1 run, checkpoints or step directory (any
    # TP / PP layout; its vision section must equal this one), or a Hugging Face Qwen2.5-VL
    # `save_pretrained` directory (its vision_config must match). Unset: random initialisation.
    init_from: Optional[str] = None
    # Also take the merger (stage 2's projector) from init_from: a Qwen2.5-VL directory's merger
    # maps to its own LLM's width; a stage-1 merger only fits when out_hidden_size is the LLM's
    # hidden size. Default: a fresh projector, as LLaVA-style alignment starts.
    init_projector: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Values per flattened patch: channels x frames x patch x patch."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def merge_unit(self) -> int:
        """Patches per merged token (2x2 = 4)."""
        return self.spatial_merge_size**2


@dataclass
class TextConfig:
    """A SigLIP2-style text tower: learned positions, pre-LN LayerNorm, GELU MLP, pooled + linear head.

    Defaults are SigLIP2-base's text tower apart from the vocabulary, which comes from the
    captions' sentencepiece model (data_tools/train_tokenizer.py).
    """

    vocab_size: int = 32000
    # Rows of the learned position table: the longest text of any phase. Shorter phases use the
    # first rows; when a phase lengthens the text, the trained rows are stretched over the longer
    # range by linear interpolation (see models/text/encoder.py).
    max_positions: int = 256
    num_layers: int = 12
    hidden_size: int = 768
    num_heads: int = 12
    ffn_hidden_size: int = 3072
    norm_eps: float = 1e-6
    # "last": the hidden state at the final position of the padded text, as SigLIP / SigLIP2
    # (texts padded to the phase's length, no attention mask), which keeps an imported tower
    # exact; "eos": the state at each caption's end-of-text token, with padding masked out.
    pooling: str = "last"
    pad_id: int = 0
    init_std: float = 0.02
    # A Hugging Face SigLIP / SigLIP2 model directory (config.json + safetensors) whose text tower
    # initialises ours when a run starts from scratch (FineViT starts from SigLIP2's). The fields
    # above must match it (checked at start), and data.tokenizer must be its sentencepiece model.
    init_from: Optional[str] = None

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass
class ContrastiveConfig:
    """What the two towers are trained against: the shared embedding and the loss."""

    embed_dim: int = 1024  # shared image-text embedding width (both projections end here)
    loss: str = "sigmoid"  # sigmoid (SigLIP) | softmax (InfoNCE, CLIP)
    # SigLIP init: logits = exp(t) * cos + b with t = log 10, b = -10 (the bias is unused by softmax).
    init_logit_scale: float = 2.302585092994046
    init_logit_bias: float = -10.0
    pool_heads: int = 16  # heads of the vision attention-pooling (MAP) probe
    chunk_size: int = 1024  # texts scored per chunk: bounds loss memory to local_images x chunk


LLM_FAMILIES = ("qwen2", "qwen3")


@dataclass
class LLMConfig:
    """A decoder LLM of the Qwen2 / Qwen2.5 or the Qwen3 family (defaults: Qwen2.5-1.5B's shape).

    qwen2 (Qwen2, Qwen2.5): q/k/v projections with bias. qwen3: no q/k/v bias, an RMSNorm on each
    head's queries and keys, and a head_dim that need not be hidden_size / num_heads. Both: grouped
    query attention, RMSNorm, SwiGLU, rotary positions in M-RoPE's (t, h, w) form: a text token has
    the same index in all three, which is plain RoPE.
    """

    family: str = "qwen2"
    vocab_size: int = 151936
    num_layers: int = 28
    hidden_size: int = 1536
    num_heads: int = 12
    num_kv_heads: int = 2  # key/value heads (query groups)
    head_dim: Optional[int] = None  # default hidden_size // num_heads
    ffn_hidden_size: int = 8960  # SwiGLU inner width
    norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
    # How the head's head_dim / 2 rotary frequencies split over (t, h, w) positions (Qwen2.5-VL:
    # [16, 24, 24] for head_dim 128). Must sum to head_dim / 2.
    mrope_section: list[int] = field(default_factory=lambda: [16, 24, 24])
    tie_embeddings: bool = True  # output layer shares the input embedding (1.5B, 3B; not 7B)
    max_positions: int = 32768
    init_std: float = 0.02
    # A Hugging Face `save_pretrained` directory (config.json + safetensors, sharded or not) of a
    # Qwen2 / Qwen2.5 / Qwen3 causal LM whose weights start the LLM; the fields above must match it.
    init_from: Optional[str] = None

    @property
    def kv_channels(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads


@dataclass
class ModelConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    contrastive: ContrastiveConfig = field(default_factory=ContrastiveConfig)
    llm: Optional[LLMConfig] = None  # stage 2's decoder (unset in stage 1)
