"""ComfyUI nodes: thin adapters from ComfyUI types to the core packages.

Only imported by ComfyUI (through ``comfy_entrypoint`` in the pack's ``__init__.py``).
Node IDs and custom types carry the ``DBLoRA_`` prefix: core ComfyUI already owns names
such as ``TrainLoraNode`` and silently wins any clash.
"""

from comfy_api.latest import ComfyExtension, io

from .data import ClassPriors, InstanceImages, LoadBaseModel, SuggestIdentifier
from .models import InspectCheckpoint
from .sampling import Evaluate, LoRAGrid, LoRASampler
from .shapes import ShapesSubject
from .training import SaveLoRAStep, TrainDreamBoothLoRA

NODES = [InspectCheckpoint, LoadBaseModel, InstanceImages, SuggestIdentifier, ClassPriors, TrainDreamBoothLoRA,
         SaveLoRAStep, LoRASampler, LoRAGrid, Evaluate, ShapesSubject]


class DreamBoothLoRAExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return NODES
