"""`dreambooth-lora convert` and `dreambooth-lora lora-info`."""

from __future__ import annotations

import argparse
import json

from .options import CONVERT_OPTIONS
from ..options import Option, OptionSet

INFO_OPTIONS = OptionSet(CONVERT_OPTIONS["base"], Option("json", False, "Print JSON instead of text.", node=False))


def register(subparsers: argparse._SubParsersAction) -> None:
    convert = subparsers.add_parser(
        "convert", help="Convert a LoRA between kohya/A1111 and PEFT/diffusers files.",
        description="Reads a kohya/A1111 LoRA or a diffusers/PEFT LoRA file (its lora_adapter_metadata keeps "
                    "alpha and rank) and writes the other format. kohya output uses the names kohya writes "
                    "(diffusers module names for SD1/SD2, LDM names for SDXL) and ss_*/modelspec metadata.")
    convert.add_argument("input", help="LoRA .safetensors file to read.")
    convert.add_argument("output", help="File to write (.safetensors).")
    CONVERT_OPTIONS.add_to_parser(convert)
    convert.set_defaults(run=run_convert)

    info = subparsers.add_parser("lora-info", help="Show a LoRA file's family, rank, alpha, modules and metadata.")
    info.add_argument("input", help="LoRA .safetensors file.")
    INFO_OPTIONS.add_to_parser(info)
    info.set_defaults(run=run_info)


def _load(path: str, base: str | None):
    from .files import detect_family, load_adapter
    from .structure import reference_structure, structure_of_checkpoint

    structure = structure_of_checkpoint(base) if base else reference_structure(detect_family(path))
    return load_adapter(path, structure)


def run_convert(args: argparse.Namespace) -> int:
    from ..models.families import FAMILIES
    from .diffusers import save_peft
    from .kohya import save_kohya

    opts = CONVERT_OPTIONS.values(args)
    adapter = _load(args.input, opts["base"])
    if opts["to"] == "kohya":
        written = save_kohya(adapter, args.output, opts["dtype"], opts["overwrite"], keep_metadata=adapter.metadata,
                             bake_alpha=opts["bake_alpha"])
    else:
        written = save_peft(adapter, args.output, opts["dtype"], opts["overwrite"])
    summary = adapter.summary()
    print(f"{written}: {opts['to']} LoRA for {FAMILIES[adapter.family].display}, {sum(summary['modules'].values())} modules "
          f"({', '.join(f'{k} {v}' for k, v in sorted(summary['modules'].items()))}), rank {summary['rank']}, alpha {summary['alpha']}, {opts['dtype']}")
    return 0


def run_info(args: argparse.Namespace) -> int:
    from ..models.families import FAMILIES

    opts = INFO_OPTIONS.values(args)
    adapter = _load(args.input, opts["base"])
    summary = adapter.summary()
    summary["family"] = FAMILIES[adapter.family].display
    summary["metadata"] = adapter.metadata
    if opts["json"]:
        print(json.dumps(summary, indent=1, default=str))
        return 0
    print(f"family:     {summary['family']}")
    print(f"algorithm:  {summary['algorithm']}")
    print("modules:    " + ", ".join(f"{k} {v}" for k, v in sorted(summary["modules"].items())) + f" (3x3 conv: {summary['conv_modules']})")
    print(f"rank:       {summary['rank']}" + (f" (all: {summary['ranks']})" if len(summary["ranks"]) > 1 else ""))
    print(f"alpha:      {summary['alpha']}" + (f" (all: {summary['alphas']})" if len(summary["alphas"]) > 1 else ""))
    for key in ("ss_output_name", "ss_base_model_version", "ss_network_module", "modelspec.architecture", "sshs_model_hash"):
        if key in adapter.metadata:
            print(f"{key}: {adapter.metadata[key]}")
    others = len(adapter.metadata) - sum(k in adapter.metadata for k in ("ss_output_name", "ss_base_model_version", "ss_network_module", "modelspec.architecture", "sshs_model_hash"))
    if others:
        print(f"(+{others} more metadata keys; --json shows all)")
    return 0
