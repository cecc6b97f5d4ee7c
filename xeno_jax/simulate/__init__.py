"""Physics-based simulator of multi-species surgical spectral images (the embedded default data)."""

from xeno_jax.simulate.camera import Camera
from xeno_jax.simulate.generate import Spec, generate, generate_batch, make_spec, stack_specs
from xeno_jax.simulate.perfusion import STATE_NAMES, PerfusionState, state_index
from xeno_jax.simulate.species import (
    HUMAN,
    PIG,
    RAT,
    Species,
    get_species,
    make_species,
    register_species,
    species_names,
    with_response_divergence,
)

__all__ = [
    "HUMAN", "PIG", "RAT", "STATE_NAMES", "Camera", "PerfusionState", "Spec", "Species",
    "generate", "generate_batch", "get_species", "make_spec", "make_species",
    "register_species", "species_names", "stack_specs", "state_index",
    "with_response_divergence",
]
