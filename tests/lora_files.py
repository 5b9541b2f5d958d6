"""LoRA files for the tests: diffusers / PEFT format written by diffusers' own
``save_lora_weights``, and the same weights in kohya / AUTOMATIC1111 format (``lora_unet_*``,
``lora_te*_``, ``.alpha``) written here, as sd-scripts names them."""

from __future__ import annotations

from pathlib import Path

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1", "ff.net.2"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1"]
#: diffusers prefix -> kohya prefix, per family
KOHYA_SD = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
KOHYA_SDXL = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}


def make_peft_lora(
    pipe, folder: Path, *, seed: int, rank: int = 4, alpha: float = 8.0, sdxl: bool = False
) -> Path:
    """Random (non-zero) PEFT adapters on the UNet and text encoder(s) of a diffusers pipeline,
    saved with diffusers' ``save_lora_weights`` (alpha in its metadata). ``pipe`` keeps the
    adapters: pass a throwaway copy."""
    import torch
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(seed)
    unet_cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=UNET_TARGETS)
    te_cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=TE_TARGETS)
    models = {"unet": (pipe.unet, unet_cfg), "text_encoder": (pipe.text_encoder, te_cfg)}
    if sdxl:
        models["text_encoder_2"] = (pipe.text_encoder_2, te_cfg)
    kwargs = {}
    for name, (model, cfg) in models.items():
        inject_adapter_in_model(cfg, model, adapter_name="tmp")
        with torch.no_grad():  # PEFT starts lora_B at zero: make every layer matter
            for key, param in model.named_parameters():
                if "lora_" in key:
                    param.copy_(torch.randn_like(param) * 0.2)
        kwargs[f"{name}_lora_layers"] = get_peft_model_state_dict(model, adapter_name="tmp")
        kwargs[f"{name}_lora_adapter_metadata"] = cfg.to_dict()
    folder.mkdir(parents=True, exist_ok=True)
    type(pipe).save_lora_weights(folder, weight_name="lora.safetensors", **kwargs)
    return folder / "lora.safetensors"


def sgm_name(path: str, per_down: int = 2) -> str:
    """A diffusers UNet module path under the original SGM names sd-scripts gives SDXL
    (``down_blocks.1.attentions.0...`` -> ``input_blocks.4.1...``), written from Stability's
    UNet layout independently of trt_sd.models.lora.sgm_names."""
    parts = path.split(".")
    resnet = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1"}
    if parts[0] == "mid_block":
        if parts[1] == "attentions":
            return ".".join(["middle_block", "1", *parts[3:]])
        return ".".join(["middle_block", str(2 * int(parts[2])), resnet[parts[3]]])
    if parts[0] not in ("down_blocks", "up_blocks"):
        raise KeyError(path)
    i, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
    if parts[0] == "down_blocks":
        block = f"input_blocks.{i * (per_down + 1) + j + 1}"
    else:
        block = f"output_blocks.{i * (per_down + 1) + j}"
    inner = [resnet[rest[0]]] if kind == "resnets" else rest
    return ".".join([block, "0" if kind == "resnets" else "1", *inner])


def to_kohya(
    peft_file: Path,
    target: Path,
    *,
    alpha: float,
    prefixes: dict[str, str],
    sgm: int = 0,
) -> Path:
    """The same layers under kohya names: ``lora_unet_<path with _>.lora_down.weight`` etc.
    (``sgm``: resnets per down block; the UNet under SDXL's original block names then, as
    sd-scripts writes SDXL files)."""
    import torch
    from safetensors.torch import load_file, save_file

    out = {}
    for key, value in load_file(peft_file).items():
        component, rest = key.split(".", 1)
        module, part = rest.rsplit(".lora_", 1)
        if component == "unet" and sgm:
            module = sgm_name(module, sgm)
        if component.startswith("text_encoder") and not module.startswith("text_model."):
            module = "text_model." + module  # as sd-scripts names CLIP's modules
        flat = prefixes[component] + module.replace(".", "_")
        out[f"{flat}.lora_{'down' if part.startswith('A') else 'up'}.weight"] = value
        out[f"{flat}.alpha"] = torch.tensor(alpha)
    save_file(out, target)
    return target
