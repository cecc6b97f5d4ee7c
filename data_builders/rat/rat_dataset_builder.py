"""Rat: the semantic multi-organ set, perfusion (clamping) experiments, and ICG."""

from data_builders.species_builder import CLAMPED, SimulatedSet, SpeciesBuilder

ALL_FOCI = (None, "stomach", "small_bowel", "colon", "liver", "pancreas", "kidney", "spleen",
            "omentum", "lung", "skin", "peritoneum")
# Organs of the 12 classes imaged in the reference's experiments (settings_species.py).
AORTIC_LABELS = ("stomach", "small_bowel", "colon", "liver", "kidney", "spleen", "omentum")
ICG_LABELS = ("stomach", "small_bowel", "colon", "liver", "pancreas", "kidney", "omentum",
              "peritoneum")


class Builder(SpeciesBuilder):
    """Rat spectral images: simulated (``sim_small``, ``sim_full``) or real (``tivita``)."""

    SPECIES = "rat"
    SUBJECT_FORMAT = "R{:03d}"

    def _sets(self, semantic, perfusion_physiological, perfusion_pathological, icg, icg_rats):
        perfusion = dict(subjects=4, first_subject=31, focus=AORTIC_LABELS)
        return [
            SimulatedSet("semantic", "physiological", "physiological", subjects=13,
                         images_per_subject=semantic, first_subject=1, focus=ALL_FOCI),
            SimulatedSet("perfusion", "physiological", "physiological",
                         images_per_subject=perfusion_physiological, **perfusion),
            # Aortic or organ clamping, not reperfused.
            SimulatedSet("perfusion", "malperfusion", "malperfusion",
                         images_per_subject=perfusion_pathological, affected=AORTIC_LABELS,
                         severity=CLAMPED, **perfusion),
            # Repeated boluses: higher cumulative doses than in pigs.
            SimulatedSet("icg", "icg", "icg", subjects=icg_rats, images_per_subject=icg,
                         first_subject=41, focus=ICG_LABELS, minutes=(0.5, 10.0),
                         icg_dose_mg_kg=(0.5, 2.0)),
        ]

    def small_sets(self):
        return self._sets(semantic=(10,), perfusion_physiological=(4,),
                          perfusion_pathological=(12,), icg=(10,), icg_rats=4)

    def paper_sets(self):
        # 597 semantic images of 13 rats; 1538 malperfused and 1137 ICG images (method.md A8,
        # B1); the physiological images of the perfusion rats are an estimate.
        return self._sets(semantic=(46,) * 12 + (45,), perfusion_physiological=(50,),
                          perfusion_pathological=(385,) * 2 + (384,) * 2,
                          icg=(228,) * 2 + (227,) * 3, icg_rats=5)
