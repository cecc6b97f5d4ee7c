"""Pig: the semantic multi-organ set, kidney and aortic-clamping malperfusion, and ICG."""

from data_builders.species_builder import CLAMPED, SimulatedSet, SpeciesBuilder

ALL_FOCI = (None, "stomach", "small_bowel", "colon", "liver", "pancreas", "kidney", "spleen",
            "omentum", "lung", "skin", "peritoneum")
# Organs of the 12 classes imaged in the reference's experiments (settings_species.py).
AORTIC_LABELS = ("stomach", "small_bowel", "colon", "liver", "spleen", "peritoneum", "skin")
ICG_LABELS = ("stomach", "small_bowel", "colon", "liver", "kidney", "spleen", "omentum", "skin",
              "pancreas", "peritoneum", "lung")


class Builder(SpeciesBuilder):
    """Pig spectral images: simulated (``sim_small``, ``sim_full``) or real (``tivita``)."""

    SPECIES = "pig"
    SUBJECT_FORMAT = "P{:03d}"

    def _sets(self, semantic, kidney_physiological, kidney_pathological, kidney_pigs, aortic,
              icg, icg_pigs):
        kidney = dict(subjects=kidney_pigs, first_subject=91, focus=("kidney",))
        return [
            SimulatedSet("semantic", "physiological", "physiological", subjects=20,
                         images_per_subject=semantic, first_subject=41, focus=ALL_FOCI),
            # Renal artery clamping (ischemia, avascular) and venous stasis of the same pigs.
            SimulatedSet("kidney", "physiological", "physiological",
                         images_per_subject=kidney_physiological, **kidney),
            SimulatedSet("kidney", "malperfusion", "malperfusion",
                         images_per_subject=kidney_pathological, severity=CLAMPED, **kidney),
            SimulatedSet("kidney", "malperfusion", "venous_congestion",
                         images_per_subject=(2,), severity=CLAMPED, **kidney),
            SimulatedSet("aortic_clamping", "malperfusion", "malperfusion", subjects=4,
                         images_per_subject=aortic, first_subject=121, focus=AORTIC_LABELS,
                         affected=AORTIC_LABELS, severity=CLAMPED),
            SimulatedSet("icg", "icg", "icg", subjects=icg_pigs, images_per_subject=icg,
                         first_subject=131, focus=ICG_LABELS, minutes=(0.5, 10.0),
                         icg_dose_mg_kg=(0.2, 0.5)),
        ]

    def small_sets(self):
        return self._sets(semantic=(8,), kidney_physiological=(5,), kidney_pathological=(8,),
                          kidney_pigs=6, aortic=(6,), icg=(10,), icg_pigs=4)

    def paper_sets(self):
        # 506 semantic images of 20 pigs; the kidney set: 511 images of 12 pigs; 564 ICG images
        # (method.md A8, B1); the aortic-clamping count is an estimate.
        return self._sets(semantic=(26,) * 6 + (25,) * 14, kidney_physiological=(14,),
                          kidney_pathological=(27,) * 11 + (22,), kidney_pigs=12, aortic=(40,),
                          icg=(47,), icg_pigs=12)
