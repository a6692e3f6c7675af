"""The CLIP and VAE values of a headless run: diffusers/transformers models behind ComfyUI's interfaces.

``TextEncoderHandle`` turns a prompt into the tensors ComfyUI's CLIPTextEncode makes (and diffusers'
``encode_prompt`` makes for prompts that fit in one 77-token window); ``VAEHandle`` converts between IMAGE
(``[B,H,W,C]`` 0..1) and *scaled* latents, the LATENT convention of ComfyUI.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

# A CLIP context is 77 tokens: start, 75 prompt tokens, end (and padding after the end token).
CONTEXT_LENGTH = 77
CHUNK_TOKENS = CONTEXT_LENGTH - 2


def _chunk_ids(tokenizer: Any, text: str) -> list[list[int]]:
    """Token ids of ``text`` as 77-token windows: [start, ≤75 prompt tokens, end, padding...].

    Like ComfyUI, a long prompt is not truncated: it becomes several windows whose encodings are
    concatenated along the token axis. An empty prompt is one window.
    """
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]  # no "too long" warning: we chunk
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    pieces = [ids[i:i + CHUNK_TOKENS] for i in range(0, len(ids), CHUNK_TOKENS)] or [[]]
    windows = []
    for piece in pieces:
        window = [bos] + piece + [eos]
        windows.append(window + [pad] * (CONTEXT_LENGTH - len(window)))
    return windows


def _place(module: Any, device: torch.device, dtype: torch.dtype) -> None:
    """Move a model to device/dtype (only when needed: a no-op cast still warns in diffusers) and freeze it."""
    first = next(module.parameters(), None)
    if first is not None and (first.device != torch.device(device) or first.dtype != dtype):
        module.to(device=device, dtype=dtype)
    module.eval().requires_grad_(False)


@dataclass
class TextEncoderHandle:
    """CLIP headless: the tokenizers and text encoders of a checkpoint.

    ``family`` is ``"sd15"`` (one CLIPTextModel) or ``"sdxl"`` (CLIPTextModel + CLIPTextModelWithProjection).
    ``patches`` (LoRA, ...) hold only while encoding; each has ``applied(module)`` (``core.weight_patches``)
    and is applied to :meth:`patch_root`. The encoders are shared: add patches with
    ``dataclasses.replace(handle, patches=handle.patches + (patch,))``, never by editing a handle.
    """

    family: str
    tokenizers: Sequence[Any]
    text_encoders: Sequence[Any]
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    patches: tuple = ()

    def __post_init__(self) -> None:
        expected = {"sd15": 1, "sdxl": 2}.get(self.family)
        if expected is None:
            raise ValueError(f"TextEncoderHandle: family must be 'sd15' or 'sdxl', got {self.family!r}")
        if len(self.tokenizers) != expected or len(self.text_encoders) != expected:
            raise ValueError(
                f"TextEncoderHandle: a {self.family} checkpoint has {expected} tokenizer(s) and text encoder(s); "
                f"got {len(self.tokenizers)} and {len(self.text_encoders)}"
            )
        for encoder in self.text_encoders:
            _place(encoder, self.device, self.dtype)

    def patch_root(self) -> torch.nn.Module:
        """The encoders under diffusers' pipeline names (``text_encoder``, ``text_encoder_2``): what the
        module names of this handle's patches are relative to. A new container each call; no copy."""
        names = ("text_encoder", "text_encoder_2")
        return torch.nn.ModuleDict(dict(zip(names, self.text_encoders)))

    @torch.no_grad()
    def encode(self, text: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Encode a prompt with this handle's patches applied (see :meth:`_encode`)."""
        with contextlib.ExitStack() as stack:
            if self.patches:
                root = self.patch_root()
                for patch in self.patches:
                    stack.enter_context(patch.applied(root))
            return self._encode(text)

    def _encode(self, text: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Encode a prompt: ``(cond [1, 77·k, D], pooled [1, P])``.

        SD1.5: the final hidden states of the text encoder (ComfyUI's default, the last layer) and its pooled
        output. SDXL: the penultimate hidden states of both encoders concatenated on the feature axis, and the
        projected pooled output (``text_embeds``) of the second one — what ``StableDiffusionXLPipeline.
        encode_prompt`` computes. The pooled output always comes from the first 77-token window.
        """
        if self.family == "sd15":
            windows = self._windows(0, text)
            out = self.text_encoders[0](windows)
            return self._join(out.last_hidden_state, len(windows)), out.pooler_output[:1].float()
        ids_1, ids_2 = self._windows(0, text), self._windows(1, text)
        if ids_1.shape != ids_2.shape:
            raise RuntimeError(
                f"SDXL text encoding: the two tokenizers split the prompt into {len(ids_1)} and {len(ids_2)} "
                f"windows; they must agree (are the tokenizers of the same checkpoint?)"
            )
        out_1 = self.text_encoders[0](ids_1, output_hidden_states=True)
        out_2 = self.text_encoders[1](ids_2, output_hidden_states=True)
        hidden = torch.cat([out_1.hidden_states[-2], out_2.hidden_states[-2]], dim=-1)
        return self._join(hidden, len(ids_1)), out_2.text_embeds[:1].float()

    def _windows(self, index: int, text: str) -> torch.Tensor:
        windows = _chunk_ids(self.tokenizers[index], text)
        return torch.tensor(windows, dtype=torch.long, device=self.device)

    @staticmethod
    def _join(hidden: torch.Tensor, count: int) -> torch.Tensor:
        # [k, 77, D] windows → [1, 77·k, D], in prompt order
        return hidden.reshape(1, count * hidden.shape[1], hidden.shape[2]).float()


@dataclass
class VAEHandle:
    """VAE headless: an AutoencoderKL with ComfyUI's IMAGE/LATENT conventions (scaling applied inside)."""

    vae: Any
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        _place(self.vae, self.device, self.dtype)

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def shift_factor(self) -> float:
        # SD1.5/SDXL VAEs have none; later VAEs store one in the config.
        return float(getattr(self.vae.config, "shift_factor", None) or 0.0)

    @property
    def downscale_ratio(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @torch.no_grad()
    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """IMAGE ``[B,H,W,C]`` 0..1 → scaled latents ``[B,4,H/8,W/8]`` (the mean of the latent distribution).

        H and W must be multiples of :attr:`downscale_ratio` (VAEEncode crops to that first).
        """
        if image.ndim != 4:
            raise ValueError(f"VAE encode: expected an IMAGE [B,H,W,C], got a tensor of shape {tuple(image.shape)}")
        ratio = self.downscale_ratio
        if image.shape[1] % ratio or image.shape[2] % ratio:
            raise ValueError(
                f"VAE encode: image size {image.shape[2]}x{image.shape[1]} is not a multiple of {ratio}; "
                f"crop or resize it first"
            )
        pixels = image[..., :3].movedim(-1, 1).to(self.device, self.dtype) * 2.0 - 1.0
        mean = self.vae.encode(pixels).latent_dist.mean
        return ((mean - self.shift_factor) * self.scaling_factor).float().cpu()

    @torch.no_grad()
    def decode(self, samples: torch.Tensor) -> torch.Tensor:
        """Scaled latents ``[B,4,h,w]`` → IMAGE ``[B,8h,8w,3]`` clamped to 0..1."""
        if samples.ndim != 4:
            raise ValueError(f"VAE decode: expected latents [B,C,h,w], got a tensor of shape {tuple(samples.shape)}")
        latents = samples.to(self.device, self.dtype) / self.scaling_factor + self.shift_factor
        pixels = self.vae.decode(latents).sample
        return ((pixels.float() + 1.0) / 2.0).clamp(0.0, 1.0).movedim(1, -1).cpu()
