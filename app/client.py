"""Python clients of the service.

`VAEClient(url)`: encode / decode / roundtrip with plain tensors and PIL images.
`RemoteAutoencoderKL(url, model=...)`: duck-types a diffusers `AutoencoderKL` so a pipeline can hold it
as its `vae`: `config.scaling_factor`, `encode(x).latent_dist.sample()/.mode()`, `decode(z).sample`,
`decode(z, return_dict=False)`, `dtype`, `device`. Latents are raw (unscaled), as in diffusers.
For an AutoencoderTiny on the server it duck-types that class instead: `encode(x).latents`.
Every family works the same (docs/families.md): 4 or 16 latent channels, packed FLUX latents
(`decode_tensor(z, height=, width=)`), the model's own factors with `do_scaling=True`.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import requests
import torch
from PIL import Image

from app.protocol import wire
from models.vae import imaging


class VAEClientError(RuntimeError):
    """A 4xx/5xx answer: `status`, `type` and `message` from the `{"error": ...}` body."""

    def __init__(self, status: int, type_: str, message: str):
        super().__init__(f"{status} {type_}: {message}")
        self.status, self.type, self.message = status, type_, message


@dataclass
class RoundtripResult:
    image: Image.Image
    psnr: float
    ssim: float
    latent_shape: list[int]


def _given(**params) -> dict:
    """Query parameters without the ones left out (None): the server's defaults apply to those."""
    return {k: v for k, v in params.items() if v is not None}


def _image_bytes(image: Image.Image | bytes | str | Path) -> bytes:
    if isinstance(image, Image.Image):
        return imaging.encode_image(image.convert("RGB"), "png")
    if isinstance(image, (str, Path)):
        return Path(image).read_bytes()
    return bytes(image)


class VAEClient:
    def __init__(self, url: str, model: str | None = None, timeout: float = 300.0, session: requests.Session | None = None):
        self.url = url.rstrip("/")
        self.model = model
        self.timeout = timeout
        self.session = session or requests.Session()

    def _post(self, path: str, data: bytes, params: dict, headers: dict) -> requests.Response:
        if self.model and "model" not in params:
            params = {**params, "model": self.model}
        response = self.session.post(f"{self.url}{path}", data=data, params=params, headers=headers, timeout=self.timeout)
        self._raise_for_error(response)
        return response

    @staticmethod
    def _raise_for_error(response: requests.Response) -> None:
        if response.ok:
            return
        try:
            err = response.json()["error"]
            raise VAEClientError(response.status_code, err["type"], err["message"])
        except (ValueError, KeyError, TypeError):
            raise VAEClientError(response.status_code, "http_error", response.text[:200]) from None

    @staticmethod
    def _tensor(response: requests.Response) -> torch.Tensor:
        shape = tuple(json.loads(response.headers["shape"]))
        return wire.tensor_from_raw(response.content, shape, wire.parse_dtype(response.headers["dtype"]))

    def models(self) -> list[dict]:
        response = self.session.get(f"{self.url}/v1/models", timeout=self.timeout)
        self._raise_for_error(response)
        return response.json()["models"]

    def model_info(self) -> dict:
        response = self.session.get(f"{self.url}/v1/models", timeout=self.timeout)
        self._raise_for_error(response)
        doc = response.json()
        name = self.model or doc["default"]
        for info in doc["models"]:
            if info["name"] == name:
                return info
        raise VAEClientError(404, "model_not_found", f"unknown model {name!r}")

    def encode(
        self,
        images: Image.Image | list[Image.Image] | torch.Tensor | bytes | str | Path,
        *,
        scaling_factor: float | None = None,
        shift_factor: float | None = None,
        sample: bool = False,
        seed: int | None = None,
        do_scaling: bool = False,
        colour_lock: int = 0,
    ) -> torch.Tensor:
        """Image(s), image file bytes/path or a float (N, 3, H, W) tensor in [-1, 1] -> latents (N, C, h, w).
        `do_scaling` (without factors): scaled with the model's own factors (and latents_mean / std).
        `colour_lock` N > 0: N closed-loop steps on the server so the latents decode to the image's mean colour."""
        params = _given(sample=str(sample).lower(), do_scaling="true" if do_scaling else None,
                        scaling_factor=scaling_factor, shift_factor=shift_factor, seed=seed,
                        colour_lock=colour_lock or None)
        if isinstance(images, list):
            return torch.cat([self.encode(img, scaling_factor=scaling_factor, shift_factor=shift_factor,
                                          sample=sample, seed=seed, do_scaling=do_scaling, colour_lock=colour_lock)
                              for img in images])
        if isinstance(images, torch.Tensor):
            x = images.detach().cpu().float().contiguous()
            params.update(shape=list(x.shape), dtype="float32")
            response = self._post("/encode", wire.tensor_to_raw(x), params, {"Content-Type": "tensor/binary"})
        else:
            response = self._post("/encode", _image_bytes(images), params, {"Accept": "tensor/binary"})
        return self._tensor(response)

    def decode_tensor(
        self,
        latents: torch.Tensor,
        *,
        scaling_factor: float | None = None,
        shift_factor: float | None = None,
        postprocess: bool = False,
        do_scaling: bool = False,
        height: int | None = None,
        width: int | None = None,
    ) -> torch.Tensor:
        """Raw (or scaled, with the factors given) latents -> float (N, 3, H, W) in [-1, 1], or
        uint8 (N, H, W, 3) when `postprocess`. `do_scaling` (without factors): the latents are scaled
        with the model's own factors. Packed FLUX latents (N, (H/16)*(W/16), 64) need the image's
        `height` and `width`; for (N, C, h, w) latents they crop the output."""
        z = latents.detach().cpu().contiguous()
        if z.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            z = z.float()
        params = _given(output_type="pt", partial_postprocess=str(postprocess), shape=list(z.shape),
                        dtype=wire.dtype_name(z.dtype), scaling_factor=scaling_factor, shift_factor=shift_factor,
                        do_scaling="true" if do_scaling else None, height=height, width=width)
        headers = {"Content-Type": "tensor/binary", "Accept": "tensor/binary"}
        return self._tensor(self._post("/decode", wire.tensor_to_raw(z), params, headers))

    def decode(self, latents: torch.Tensor, **kwargs) -> list[Image.Image]:
        """Latents (N, C, h, w) -> N PIL images (sent back as uint8 tensors: lossless and compact)."""
        return imaging.to_pil(self.decode_tensor(latents, postprocess=True, **kwargs))

    def roundtrip(self, image: Image.Image | bytes | str | Path, image_format: str = "png",
                  colour_lock: int = 0) -> RoundtripResult:
        """Image -> encode -> decode on the server; the image back plus PSNR / SSIM against the input.
        `colour_lock`: as in `encode`."""
        params = _given(image_format=image_format, colour_lock=colour_lock or None)
        response = self._post("/roundtrip", _image_bytes(image), params, {})
        return RoundtripResult(
            image=Image.open(io.BytesIO(response.content)).convert("RGB"),
            psnr=float(response.headers["X-PSNR"]),
            ssim=float(response.headers["X-SSIM"]),
            latent_shape=json.loads(response.headers["X-Latent-Shape"]),
        )


# --- diffusers drop-in --------------------------------------------------------------------------

class _Config(dict):
    """A dict with attribute access, like diffusers' FrozenDict config."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class RemoteLatentDist:
    """Stands for DiagonalGaussianDistribution: `mode()` / `mean` / `sample(generator)` ask the server.

    `sample` draws the seed for the server from `generator`, so a seeded generator gives reproducible
    latents (not the same numbers as an in-process `sample` with that generator).
    """

    def __init__(self, vae: "RemoteAutoencoderKL", x: torch.Tensor):
        self._vae, self._x, self._mode = vae, x, None

    def mode(self) -> torch.Tensor:
        if self._mode is None:
            self._mode = self._vae._encode(self._x, sample=False, seed=None)
        return self._mode

    @property
    def mean(self) -> torch.Tensor:
        return self.mode()

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        seed = int(torch.randint(0, 2**62, (1,), generator=generator).item())
        return self._vae._encode(self._x, sample=True, seed=seed)


class RemoteAutoencoderKL:
    """An AutoencoderKL (or, for a served AutoencoderTiny, an AutoencoderTiny) look-alike whose
    encode/decode run on a `vae serve` instance."""

    def __init__(self, url: str, model: str | None = None, client: VAEClient | None = None):
        self.client = client or VAEClient(url, model=model)
        info = self.client.model_info()
        self.name = info["name"]
        self.config = _Config(info["config"])
        self.config.setdefault("scaling_factor", info["scaling_factor"])
        self.config.setdefault("shift_factor", info["shift_factor"])
        self.config.setdefault("_class_name", info.get("class", "AutoencoderKL"))
        self.dtype = torch.float32  # what this client hands back; the server may compute in bf16
        self.device = torch.device("cpu")

    def _encode(self, x: torch.Tensor, sample: bool, seed: int | None) -> torch.Tensor:
        return self.client.encode(x, sample=sample, seed=seed).to(device=x.device, dtype=x.dtype)

    def encode(self, x: torch.Tensor, return_dict: bool = True):
        """x: (N, 3, H, W) in [-1, 1] -> AutoencoderKLOutput(latent_dist=RemoteLatentDist), or for a
        served AutoencoderTiny AutoencoderTinyOutput(latents=...) as that class answers."""
        from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKLOutput

        if self.config.get("_class_name") == "AutoencoderTiny":
            from diffusers.models.autoencoders.autoencoder_tiny import AutoencoderTinyOutput

            z = self._encode(x, sample=False, seed=None)
            return AutoencoderTinyOutput(latents=z) if return_dict else (z,)
        dist = RemoteLatentDist(self, x)
        return AutoencoderKLOutput(latent_dist=dist) if return_dict else (dist,)

    def decode(self, z: torch.Tensor, return_dict: bool = True, generator=None):
        """Raw latents (N, C, h, w) -> DecoderOutput(sample=(N, 3, H, W) float in [-1, 1])."""
        from diffusers.models.autoencoders.vae import DecoderOutput

        x = self.client.decode_tensor(z).to(device=z.device, dtype=z.dtype)
        return DecoderOutput(sample=x) if return_dict else (x,)

    def to(self, *args, **kwargs) -> "RemoteAutoencoderKL":
        return self  # weights live on the server

    def eval(self) -> "RemoteAutoencoderKL":
        return self
