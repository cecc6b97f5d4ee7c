"""Human: physiological multi-organ images and malperfused kidneys (kidney transplantation)."""

from data_builders.species_builder import CLAMPED, SimulatedSet, SpeciesBuilder

ALL_FOCI = (None, "stomach", "small_bowel", "colon", "liver", "pancreas", "kidney", "spleen",
            "omentum", "lung", "skin", "peritoneum")


class Builder(SpeciesBuilder):
    """Human spectral images: simulated (``sim_small``, ``sim_full``) or real (``tivita``)."""

    SPECIES = "human"
    SUBJECT_FORMAT = "SPACE_{:06d}"

    def small_sets(self):
        return [
            SimulatedSet("semantic", "physiological", "physiological", subjects=40,
                         images_per_subject=(5,), first_subject=1, focus=ALL_FOCI),
            SimulatedSet("kidney_transplant", "malperfusion", "malperfusion", subjects=10,
                         images_per_subject=(4,), first_subject=301, focus=("kidney",),
                         severity=CLAMPED, annotation="polygon"),
        ]

    def paper_sets(self):
        return [
            # 794 physiological images of 213 patients (method.md A8).
            SimulatedSet("semantic", "physiological", "physiological", subjects=213,
                         images_per_subject=(4,) * 155 + (3,) * 58, first_subject=1,
                         focus=ALL_FOCI),
            # Malperfused kidneys, polygon annotations (count not published; an estimate).
            SimulatedSet("kidney_transplant", "malperfusion", "malperfusion", subjects=23,
                         images_per_subject=(6,), first_subject=301, focus=("kidney",),
                         severity=CLAMPED, annotation="polygon"),
        ]
