"""Options for loading a base model (shared by every stage that loads one)."""

from ..options import Option, OptionSet

DTYPE = Option(
    "dtype", "auto",
    "Precision the model weights are loaded in. auto = fp16 on CUDA, fp32 on CPU (CPUs run "
    "fp16 slowly or not at all); bf16 needs an Ampere-or-newer GPU.",
    choices=("auto", "fp32", "fp16", "bf16"))
PREDICTION_TYPE = Option(
    "prediction_type", "auto",
    "What the UNet predicts. auto reads it from the file (a v_pred key, modelspec metadata, or "
    "for SD2 the weight statistics ComfyUI also uses); set v_prediction for SD2 768-v models "
    "that are detected wrongly, epsilon for SD2 512-base ones.",
    choices=("auto", "epsilon", "v_prediction"))

LOAD_OPTIONS = OptionSet(DTYPE, PREDICTION_TYPE)

INSPECT_OPTIONS = LOAD_OPTIONS + OptionSet(
    Option("quick", False, "Read only the file header and shapes; skip building the models.", node=False),
    Option("json", False, "Print the findings as JSON instead of text.", node=False),
)
