"""CLIPTextEncode headless: a prompt → CONDITIONING ``[[cond, {"pooled_output": pooled}]]``."""
from __future__ import annotations


class CLIPTextEncode:
    """CLIP Text Encode (Prompt)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "text": ("STRING", {"multiline": True, "dynamicPrompts": True, "tooltip": "The text to be encoded."}),
            "clip": ("CLIP", {"tooltip": "The CLIP model used for encoding the text."}),
        }}

    RETURN_TYPES = ("CONDITIONING",)
    OUTPUT_TOOLTIPS = ("A conditioning containing the embedded text used to guide the diffusion model.",)
    FUNCTION = "encode"
    CATEGORY = "conditioning"
    DESCRIPTION = ("Encodes a text prompt using a CLIP model into an embedding that can be used to guide the "
                   "diffusion model towards generating specific images.")

    def encode(self, clip, text: str):
        if clip is None:
            raise RuntimeError("CLIPTextEncode: the 'clip' input is None; the checkpoint loaded has no text "
                               "encoder. Connect a CLIP output that holds one.")
        cond, pooled = clip.encode(text)
        # SDXL size/crop entries are left out on purpose: the sampler fills ComfyUI's defaults (latent size).
        return ([[cond, {"pooled_output": pooled}]],)


NODE_CLASS_MAPPINGS = {"CLIPTextEncode": CLIPTextEncode}
NODE_DISPLAY_NAME_MAPPINGS = {"CLIPTextEncode": "CLIP Text Encode (Prompt)"}
