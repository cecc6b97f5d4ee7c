"""(c) Variance decomposition of physiological organ spectra, as the paper's linear mixed model.

Per organ and wavelength, the L1-normalised reflectance of repeated measures (the medians of
disjoint pixel subsets of an image, `extract`) follows

    y = mu + a_species + b_subject(species) + c_image(subject) + e,

with independent normal random effects of variances sigma^2_species, sigma^2_subject,
sigma^2_image and sigma^2_residual, fitted by restricted maximum likelihood (REML). The
fractions sigma^2_k / sum_k sigma^2_k are reported per organ and wavelength.

Estimator. statsmodels' `MixedLM` fits this model (`fit_statsmodels`, kept as the reference),
but needs about a second per response: 11 organs x 100 wavelengths, refitted for every
bootstrap resample, would take hours on two cores. `fit_reml` maximises the same REML
likelihood for all organs, wavelengths and resamples at once: the effects are nested, so the
inverse and determinant of the covariance follow from one Sherman-Morrison update per level
(image, subject, species) on per-image sufficient statistics, and damped Newton steps
run vmapped over every response. The tests check it against `MixedLM` and against data drawn
with known variances.

Intervals: subjects are resampled with replacement within each species (the species are the
populations compared, so they are not resampled) and the model is refitted; with three species
the species variance itself is estimated from three levels, which no resampling of subjects can
widen, so read the species fraction's interval as the subject-sampling part of its uncertainty.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from xeno_jax.analysis.extract import OrganSpectra
from xeno_jax.analysis.spectra import interval

COMPONENTS = ("species", "subject", "image", "residual")
ITERATIONS = 20  # damped Newton steps per fit
RESAMPLE_ITERATIONS = 8  # ... per bootstrap refit, started from the point estimate
LOG_VARIANCE_RANGE = (-20.0, 5.0)  # of standardised responses: variance fractions 0 .. 1


@dataclasses.dataclass(frozen=True)
class Design:
    """Per-image sufficient statistics of one or more responses, padded to common shapes.

    Attributes:
      count: (..., I) repeated measures per image (0 for padding).
      total, squares: (..., I, R) sums of the responses and of their squares per image.
      subject: (..., I) subject index of each image (0 .. S - 1).
      species: (..., S) species index of each subject (0 .. P - 1).
      num_species: P (static).
    """

    count: np.ndarray
    total: np.ndarray
    squares: np.ndarray
    subject: np.ndarray
    species: np.ndarray
    num_species: int


def design(values: np.ndarray, image: np.ndarray, subject: np.ndarray, species: np.ndarray
           ) -> Design:
    """A `Design` from repeated measures: values (N, R) with their image, subject and species.

    Rows with a NaN in `values` are dropped. Subjects are nested in species and images in
    subjects (names are taken as given: use unique names per level).
    """
    keep = np.all(np.isfinite(values), axis=1)
    values, image, subject, species = values[keep], image[keep], subject[keep], species[keep]
    images, image_row = np.unique(image, return_inverse=True)
    subjects, subject_row = np.unique(subject, return_inverse=True)
    species_names, species_row = np.unique(species, return_inverse=True)
    count = np.bincount(image_row, minlength=len(images)).astype(np.float64)
    total = np.zeros((len(images), values.shape[1]))
    squares = np.zeros_like(total)
    np.add.at(total, image_row, values)
    np.add.at(squares, image_row, values**2)
    image_subject = np.zeros(len(images), np.int64)
    image_subject[image_row] = subject_row
    subject_species = np.zeros(len(subjects), np.int64)
    subject_species[subject_row] = species_row
    return Design(count, total, squares, image_subject, subject_species, len(species_names))


def _pad(designs: list[Design]) -> Design:
    """Stacks designs along a new first axis, padding with empty images and subjects."""
    images = max(len(d.count) for d in designs)
    subjects = max(len(d.species) for d in designs)
    pad = lambda x, n: np.pad(x, [(0, n - x.shape[0])] + [(0, 0)] * (x.ndim - 1))
    return Design(
        count=np.stack([pad(d.count, images) for d in designs]),
        total=np.stack([pad(d.total, images) for d in designs]),
        squares=np.stack([pad(d.squares, images) for d in designs]),
        subject=np.stack([pad(d.subject, images) for d in designs]),
        species=np.stack([pad(d.species, subjects) for d in designs]),
        num_species=max(d.num_species for d in designs))


def _add_level(stats, variance):
    """Sherman-Morrison: the statistics of ``A + variance 1 1^T`` from those of block ``A``.

    stats = (1^T A^-1 1, 1^T A^-1 y, y^T A^-1 y, log det A).
    """
    s11, s1y, syy, logdet = stats
    denominator = 1.0 + variance * s11
    return (s11 / denominator, s1y / denominator, syy - variance * s1y**2 / denominator,
            logdet + jnp.log(denominator))


def _sum_into(stats, segment, num_segments, weight=None):
    weighted = stats if weight is None else tuple(s * weight for s in stats)
    return tuple(jax.ops.segment_sum(s, segment, num_segments) for s in weighted)


def negative_reml(log_variances, count, total, squares, subject, species, weights,
                  num_species: int):
    """Minus the REML log-likelihood (up to a constant) of one response.

    Args:
      log_variances: (4,) log of the species, subject, image and residual variances.
      count, total, squares: (I,) per-image counts, sums and sums of squares.
      subject: (I,) subject of each image; species: (S,) species of each subject.
      weights: (S,) how often each subject counts (1, or bootstrap counts).
    """
    v_species, v_subject, v_image, v_residual = jnp.exp(log_variances)
    # Observations of an image: residual block, then the image effect.
    stats = (count / v_residual, total / v_residual, squares / v_residual,
             count * jnp.log(v_residual))
    stats = _add_level(stats, v_image)
    stats = _add_level(_sum_into(stats, subject, len(species)), v_subject)
    stats = _add_level(_sum_into(stats, species, num_species, weights), v_species)
    s11, s1y, syy, logdet = (jnp.sum(s) for s in stats)
    return 0.5 * (logdet + jnp.log(s11) + syy - s1y**2 / s11)


def _fit(start, count, total, squares, subject, species, weights, num_species: int,
         iterations: int):
    """REML log-variances (4,) of one standardised response.

    Damped Newton (Levenberg-Marquardt) steps on the log-variances, a fixed number of them so
    that millions of fits vmap with static shapes; a step is taken only if it lowers the
    objective, and the damping adapts per fit.
    """
    def objective(theta):
        return negative_reml(theta, count, total, squares, subject, species, weights,
                             num_species)
    value_and_grad = jax.value_and_grad(objective)
    hessian = jax.hessian(objective)

    def step(carry, _):
        theta, damping = carry
        value, grad = value_and_grad(theta)
        curvature = hessian(theta) + damping * jnp.eye(4)
        proposal = jnp.clip(theta + jnp.clip(jnp.linalg.solve(curvature, -grad), -3.0, 3.0),
                            *LOG_VARIANCE_RANGE)
        better = objective(proposal) < value
        return (jnp.where(better, proposal, theta),
                jnp.where(better, damping * 0.3, damping * 10.0)), None

    (theta, _), _ = jax.lax.scan(step, (start, jnp.asarray(1.0)), length=iterations)
    return theta


@functools.partial(jax.jit, static_argnames=("num_species", "iterations"))
def _fit_all(start, count, total, squares, subject, species, weights, num_species: int,
             iterations: int):
    """Log-variances (B, O, R, 4) for resamples B, organs O and responses R."""
    per_response = jax.vmap(_fit, in_axes=(0, None, 1, 1, None, None, None, None, None))
    per_organ = jax.vmap(per_response, in_axes=(0, 0, 0, 0, 0, 0, 0, None, None))
    per_resample = lambda w: per_organ(start, count, total, squares, subject, species, w,
                                       num_species, iterations)
    return jax.lax.map(per_resample, weights)


def _standardise(values: np.ndarray) -> np.ndarray:
    mean = np.nanmean(values, axis=0)
    scale = np.nanstd(values, axis=0)
    return (values - mean) / np.where(scale > 0, scale, 1.0)


def fit_reml(designs: list[Design], weights: np.ndarray | None = None,
             start: np.ndarray | None = None, iterations: int = ITERATIONS) -> np.ndarray:
    """REML variances (B, O, R, 4) of the responses of O designs under B subject weightings.

    Responses should be standardised (the fractions do not depend on their scale).

    Args:
      designs: O designs with R responses each.
      weights: (B, O, S) subject counts per resample (default: one all-ones weighting).
      start: (O, R, 4) variances to start from (default: 0.25 each).
      iterations: damped Newton steps.
    """
    d = _pad(designs)
    if weights is None:
        weights = np.ones((1, *d.species.shape))
    if start is None:
        start = np.full((*d.total.shape[::2], 4), 0.25)
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    log_variances = _fit_all(f32(np.log(start)), f32(d.count), f32(d.total), f32(d.squares),
                             jnp.asarray(d.subject, jnp.int32), jnp.asarray(d.species, jnp.int32),
                             f32(weights), num_species=d.num_species, iterations=iterations)
    return np.exp(np.asarray(log_variances, np.float64))


def fit_statsmodels(values: np.ndarray, image, subject, species) -> np.ndarray:
    """REML variances (4,) of one response with statsmodels' MixedLM (the reference fit).

    Species are the groups with a random intercept; subjects and images are variance
    components (their names unique across groups).
    """
    import pandas as pd
    import statsmodels.formula.api as smf

    frame = pd.DataFrame({"y": values, "image": image, "subject": subject, "species": species})
    model = smf.mixedlm("y ~ 1", frame, groups="species", re_formula="1",
                        vc_formula={"subject": "0 + C(subject)", "image": "0 + C(image)"})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence chatter at variance boundaries
        result = model.fit(reml=True)
    components = dict(zip(model.exog_vc.names, result.vcomp, strict=True))
    return np.array([float(result.cov_re.iloc[0, 0]), components["subject"],
                     components["image"], float(result.scale)])


@dataclasses.dataclass(frozen=True)
class Decomposition:
    """Variance fractions of physiological organ spectra.

    Attributes:
      labels: (O,) organ label indices.
      fractions: (O, C, 4) fractions of `COMPONENTS` per organ and wavelength.
      samples: (B, O, C, 4) the same for each subject-bootstrap resample.
      images, subjects: (O,) counts per organ; species: (O,) species per organ.
    """

    labels: np.ndarray
    fractions: np.ndarray
    samples: np.ndarray
    images: np.ndarray
    subjects: np.ndarray
    species: np.ndarray

    def organ_summary(self) -> list[dict]:
        """Per organ: median over wavelengths of each fraction, with its interval."""
        rows = []
        point = np.median(self.fractions, axis=1)
        samples = np.median(self.samples, axis=2)
        low, high = interval(samples)
        for o, label in enumerate(self.labels):
            rows.append({"label": int(label), "images": int(self.images[o]),
                         "subjects": int(self.subjects[o]), "n_species": int(self.species[o]),
                         **{c: (float(point[o, k]), float(low[o, k]), float(high[o, k]))
                            for k, c in enumerate(COMPONENTS)}})
        return rows

    def overall(self) -> dict:
        """Median over organs and wavelengths of each fraction, with its interval."""
        point = np.median(self.fractions.reshape(-1, 4), axis=0)
        samples = np.median(self.samples.reshape(len(self.samples), -1, 4), axis=1)
        low, high = interval(samples)
        return {c: (float(point[k]), float(low[k]), float(high[k]))
                for k, c in enumerate(COMPONENTS)}


def decompose(table: OrganSpectra, *, resamples: int = 20, seed: int = 0,
              min_species: int = 2) -> Decomposition:
    """The variance decomposition of the physiological spectra of every organ in the table.

    Organs seen in fewer than `min_species` species are left out (no species variance to
    estimate). Repeated measures are the pixel-subset medians (`OrganSpectra.parts`).
    """
    physiological = table.where(perfusion_state="physiological")
    designs, labels, images, subjects, species = [], [], [], [], []
    for label in np.unique(physiological.label):
        rows = physiological.where(label=int(label))
        if len(np.unique(rows.species)) < min_species:
            continue
        parts = rows.parts.shape[1]
        values = _standardise(rows.parts.reshape(-1, rows.parts.shape[2]))
        subject = np.char.add(np.char.add(rows.species, "/"), rows.subject)
        designs.append(design(values, *(np.repeat(x, parts) for x in (
            rows.image_name, subject, rows.species))))
        labels.append(int(label))
        images.append(len(np.unique(rows.image_name)))
        subjects.append(len(np.unique(subject)))
        species.append(len(np.unique(rows.species)))
    if not designs:
        raise ValueError(f"no organ has physiological images of at least {min_species} species")
    point = fit_reml(designs)[0]
    rng = np.random.default_rng(seed)
    weights = np.zeros((resamples, len(designs), max(len(d.species) for d in designs)))
    for o, d in enumerate(designs):
        for p in range(d.num_species):
            members = np.flatnonzero(d.species == p)
            weights[:, o, members] = rng.multinomial(
                len(members), np.full(len(members), 1 / len(members)), size=resamples)
    # Resamples start from the point estimate: fewer steps reach their optimum.
    samples = (fit_reml(designs, weights, start=np.maximum(point, 1e-6),
                        iterations=RESAMPLE_ITERATIONS) if resamples
               else np.full((1, *point.shape), np.nan))
    fraction = lambda v: v / v.sum(-1, keepdims=True)
    return Decomposition(np.array(labels), fraction(point), fraction(samples), np.array(images),
                         np.array(subjects), np.array(species))
