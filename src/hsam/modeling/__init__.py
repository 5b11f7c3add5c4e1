"""H-SAM network modules (no I/O, no config objects: `hsam.build` assembles them)."""

from hsam.modeling.cmattn import ClassBalancedMaskAttention
from hsam.modeling.decoders import HierarchicalPixelDecoder, Stage1Decoder, Stage2Decoder
from hsam.modeling.hsam import HSAM, HSAMOutput
from hsam.modeling.lora import LoRALinear, LoRAQKV
from hsam.modeling.prompt import PromptFreeEncoder
from hsam.modeling.transformer import TwoWayTransformer

__all__ = [
    "HSAM",
    "ClassBalancedMaskAttention",
    "HSAMOutput",
    "HierarchicalPixelDecoder",
    "LoRALinear",
    "LoRAQKV",
    "PromptFreeEncoder",
    "Stage1Decoder",
    "Stage2Decoder",
    "TwoWayTransformer",
]
