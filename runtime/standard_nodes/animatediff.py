"""AnimateDiffLoader headless: give a MODEL motion modules, so a latent batch is denoised as one video."""
from __future__ import annotations

from .. import animatediff


class AnimateDiffLoader:
    """Load AnimateDiff: the model's UNet with the motion modules of a MotionAdapter folder or file.

    The returned MODEL denoises the latent batch as the frames of one video (at most the module's
    ``motion_max_seq_length`` frames, 32 for AnimateDiff v2/v3); IP-Adapters apply to every frame.
    """

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The SD1.5 model to animate."}),
            "motion_module": (animatediff.list_motion_modules(), {"tooltip": "A diffusers MotionAdapter folder or "
                              "an AnimateDiff motion module file from the animatediff_models folder."}),
        }}

    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The model with motion modules: the latent batch is the video's frames.",)
    FUNCTION = "load"
    CATEGORY = "animatediff"

    def load(self, model, motion_module: str):
        adapter = animatediff.load_motion_adapter(motion_module)
        return (animatediff.animatediff_model(model, adapter, motion_module),)


NODE_CLASS_MAPPINGS = {"AnimateDiffLoader": AnimateDiffLoader}
NODE_DISPLAY_NAME_MAPPINGS = {"AnimateDiffLoader": "Load AnimateDiff Motion Module"}
