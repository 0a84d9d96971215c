"""Bases that see delta W = B A rather than the factors, so an adapter's gauge (A -> R A,
B -> B R^-1 for any invertible R) changes nothing.

Joint bases (after "Compress then Serve", Brüel-Gabrielsson et al. 2025): per module, orthonormal
U (d_out, c) and V (d_in, c) shared by the collection, fitted to maximise sum_i ||U^T dW_i V||_F^2
by alternating eigenproblems; each adapter keeps a core U^T dW_i V (c x c, rank <= r), stored as
factors P_i (c, q) and Q_i (q, c) of its best rank-q approximation. Rebuilt: B' = U P_i,
A' = Q_i V^T. Everything goes through the factors: U's problem is sum_i B_i (A_i V)(A_i V)^T B_i^T
(d_out x d_out), V's is sum_i A_i^T (B_i^T U)(B_i^T U)^T A_i (d_in x d_in); no d_out x d_in
matrix is formed.

Canonical factors: B = Q_b R_b and A^T = Q_a R_a (thin QR), then the SVD X S Y^T of the r x r
R_b R_a^T gives dW = (Q_b X) S (Q_a Y)^T; the balanced factors B^ = Q_b X S^1/2, A^ = S^1/2 Y^T Q_a^T,
with the sign of each pair fixed, depend on dW alone (for distinct singular values). Aligned
factors then re-parameterise every adapter's canonical factors: by an orthogonal R_i towards a
reference first (orthogonal Procrustes), then by invertible R_i towards the adapter's own
rebuild by a rank-k flat fit of the aligned collection (Gauss-Newton steps). A flat SVD of
aligned factors sees structure that lives in factor space, whatever each adapter's gauge
(`compress --method aligned`).

Adapters of different ranks are zero-padded to the largest: B A is unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import scipy.linalg
import torch

from pipeline.linalg.decompose import Decomposition, centred_svd, project, reconstruct

JOINT_ITERATIONS = 10
JOINT_TOLERANCE = 1e-5  # relative gain of the captured energy below which the fit stops
ALIGN_ROUNDS = 3
REFINE_ROUNDS = 20  # orthogonal rounds towards the rank-k structure
GAUSS_NEWTON_STEPS = 30  # then invertible ones


def pad_rank(a: torch.Tensor, b: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors (n, r, d_in), (n, d_out, r) zero-padded to `rank`: B A is unchanged."""
    extra = rank - a.shape[-2]
    if extra <= 0:
        return a, b
    return torch.nn.functional.pad(a, (0, 0, 0, extra)), torch.nn.functional.pad(b, (0, extra))


def canonical_factors(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A^, B^, s): balanced factors of the SVD of each B A, from (n, r, d_in) and (n, d_out, r),
    float64; s (n, r) the singular values, descending. Signs fixed so the largest entry of each
    column of B^ is positive."""
    a, b = a.to(torch.float64), b.to(torch.float64)
    qb, rb = torch.linalg.qr(b)  # (n, d_out, r), (n, r, r)
    qa, ra = torch.linalg.qr(a.transpose(1, 2))  # (n, d_in, r), (n, r, r)
    x, s, yh = torch.linalg.svd(rb @ ra.transpose(1, 2))
    root = s.sqrt()
    b_hat = (qb @ x) * root[:, None, :]
    a_hat = (root[:, :, None] * yh) @ qa.transpose(1, 2)
    pivots = b_hat.abs().argmax(dim=1, keepdim=True)
    signs = torch.sign(torch.gather(b_hat, 1, pivots)).squeeze(1)
    signs[signs == 0] = 1
    return a_hat * signs[:, :, None], b_hat * signs[:, None, :], s


def align(
    a: torch.Tensor,
    b: torch.Tensor,
    components: int | None = None,
    rounds: int = ALIGN_ROUNDS,
    refine: int = REFINE_ROUNDS,
    steps: int = GAUSS_NEWTON_STEPS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Canonical factors of every adapter, re-parameterised (B A unchanged) into one gauge.
    First an orthogonal R_i towards the collection's reference (orthogonal Procrustes: R_i A^_i
    near the reference A, B^_i R_i^T near the reference B), the reference starting as the adapter
    of largest ||B A|| and then the mean of the aligned factors, `rounds` times. Then, given
    `components` k, towards each adapter's own rebuild by a rank-k flat fit of the aligned
    collection (the structure sought is a k-dimensional one): `refine` orthogonal rounds, then
    `steps` Gauss-Newton steps of an invertible R_i (_gl_step), since balancing (the canonical
    form) moved every adapter off that structure by a non-orthogonal R. Measured flat errors on
    two qwen0.5b-shaped gauge modules: 0.35-0.50 reference only, 0.051-0.097 after the orthogonal
    rounds, 0.040-0.048 after both (0.027 for the un-rotated twin)."""
    a_hat, b_hat, s = canonical_factors(a, b)
    first = int(s.pow(2).sum(dim=1).argmax())
    ref_a, ref_b = a_hat[first].expand_as(a_hat), b_hat[first].expand_as(b_hat)
    for _ in range(rounds):
        a_hat, b_hat = _procrustes(a_hat, b_hat, ref_a, ref_b)
        ref_a, ref_b = a_hat.mean(dim=0).expand_as(a_hat), b_hat.mean(dim=0).expand_as(b_hat)
    for step, count in ((_procrustes, refine), (_gl_step, steps)) if components else ():
        for _ in range(count):
            a_hat, b_hat = step(a_hat, b_hat, _flat_rebuild(a_hat, components), _flat_rebuild(b_hat, components))
    return a_hat, b_hat


def align_to(
    a: torch.Tensor, b: torch.Tensor, basis_a: Decomposition, basis_b: Decomposition, rounds: int = REFINE_ROUNDS
) -> tuple[torch.Tensor, torch.Tensor]:
    """New adapters' canonical factors put into the gauge of a collection already aligned and
    fitted (bases of its flattened lora_A and lora_B): rotated towards the bases' means first,
    then `rounds` Gauss-Newton steps towards each adapter's own rebuild on the bases. B A is
    unchanged."""
    a_hat, b_hat, _ = canonical_factors(a, b)
    ref_a = basis_a.mean.to(a_hat).view(a_hat.shape[1:]).expand_as(a_hat)
    ref_b = basis_b.mean.to(b_hat).view(b_hat.shape[1:]).expand_as(b_hat)
    a_hat, b_hat = _procrustes(a_hat, b_hat, ref_a, ref_b)
    for _ in range(rounds):
        a_hat, b_hat = _gl_step(a_hat, b_hat, _rebuild_on(a_hat, basis_a), _rebuild_on(b_hat, basis_b))
    return a_hat, b_hat


def align_rows(
    xa: torch.Tensor,
    xb: torch.Tensor,
    shapes,
    components: int | None = None,
    bases: tuple[Decomposition, Decomposition] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flattened factors xa (n, r*d_in), xb (n, d_out*r) of one module put in one gauge: among
    themselves (align, towards a structure of `components` directions) or into the gauge of the
    lora_A and lora_B `bases` (align_to). float32, the same shapes."""
    (r, d_in), (d_out, _) = shapes
    a, b = xa.reshape(-1, r, d_in), xb.reshape(-1, d_out, r)
    aligned = align(a, b, components) if bases is None else align_to(a, b, *bases)
    return aligned[0].reshape(len(xa), -1).to(torch.float32), aligned[1].reshape(len(xb), -1).to(torch.float32)


def _procrustes(a_hat, b_hat, ref_a, ref_b):
    """Each adapter's factors rotated by the orthogonal R maximising tr(R^T M), M = ref_A A^^T +
    ref_B^T B^: R = U_M V_M^T."""
    u, _, vh = torch.linalg.svd(ref_a @ a_hat.transpose(1, 2) + ref_b.transpose(1, 2) @ b_hat)
    rotation = u @ vh
    return rotation @ a_hat, b_hat @ rotation.transpose(1, 2)


def _gl_step(a_hat, b_hat, ref_a, ref_b):
    """Each adapter's factors re-parameterised (R A, B R^-1) by one Gauss-Newton step towards the
    references: R = I + E, E the least-squares solution of the linearised E A ~ ref_A - A,
    B E ~ B - ref_B, i.e. the Sylvester equation E (A A^T) + (B^T B) E = (ref_A - A) A^T +
    B^T (B - ref_B), solved in the two matrices' eigenbases. R^-1 is applied exactly, so B A is
    unchanged to rounding. Directions where both A A^T and B^T B vanish (zero-padded ranks) are
    left alone."""
    gram_a, gram_b = a_hat @ a_hat.transpose(1, 2), b_hat.transpose(1, 2) @ b_hat
    rhs = (ref_a - a_hat) @ a_hat.transpose(1, 2) + b_hat.transpose(1, 2) @ (b_hat - ref_b)
    values_a, vectors_a = torch.linalg.eigh(gram_a)
    values_b, vectors_b = torch.linalg.eigh(gram_b)
    denominator = values_b[:, :, None] + values_a[:, None, :]
    scale = denominator.amax(dim=(1, 2), keepdim=True)
    rotated = vectors_b.transpose(1, 2) @ rhs @ vectors_a
    step = torch.where(denominator > 1e-12 * scale, rotated / denominator.clamp_min(1e-300), torch.zeros_like(rotated))
    identity = torch.eye(a_hat.shape[1], dtype=a_hat.dtype, device=a_hat.device)
    r = identity + vectors_b @ step @ vectors_a.transpose(1, 2)
    # A step that would make R singular or non-finite (an ill-conditioned adapter) is not taken.
    sound = torch.isfinite(r).all(dim=(1, 2)) & (torch.linalg.cond(torch.nan_to_num(r)) < 1e6)
    r = torch.where(sound[:, None, None], r, identity)
    return r @ a_hat, b_hat @ torch.linalg.inv(r)


def _flat_rebuild(x: torch.Tensor, k: int) -> torch.Tensor:
    """Each row of x (n, ...) rebuilt from its projection on the top k centred directions."""
    return _rebuild_on(x, centred_svd(x.reshape(len(x), -1).to(torch.float32), k))


def _rebuild_on(x: torch.Tensor, dec: Decomposition) -> torch.Tensor:
    """Each row of x (n, ...) rebuilt from its projection on the basis dec."""
    flat = x.reshape(len(x), -1)
    components, mean = dec.components.to(flat.device), dec.mean.to(flat.device)
    return reconstruct(project(flat, components, mean), components, mean).to(x.dtype).view_as(x)


@dataclass
class JointBasis:
    """u (d_out, c) and v (d_in, c) orthonormal columns; energy: sum_i ||U^T dW_i V||^2 captured,
    total: sum_i ||dW_i||^2."""

    u: torch.Tensor
    v: torch.Tensor
    energy: float
    total: float
    iterations: int


def fit_joint(
    a: torch.Tensor, b: torch.Tensor, c: int, iterations: int = JOINT_ITERATIONS, init: JointBasis | None = None
) -> JointBasis:
    """Shared U, V of width c for factors a (n, r, d_in), b (n, d_out, r), by alternating
    maximisations (none loses captured energy). `init` warm-starts from earlier bases (a re-base);
    otherwise V starts from sum_i A_i^T B_i^T B_i A_i. Each step maximises over the span of the
    previous bases and one block power step (_leading); no d x d matrix is formed unless c is
    near d."""
    # float64 throughout: in float32 the stopping iteration, and so the bases, can differ with
    # the rounding of threaded sums (1e-3 changes of rebuilt delta W between runs).
    a, b = a.to(torch.float64), b.to(torch.float64)
    n, r, d_in = a.shape
    d_out = b.shape[1]
    c = min(c, d_out, d_in)
    # The factors side by side, (d, n r): sum_i F_i M_i F_i^T is then one product with a block diagonal.
    b_side = b.transpose(0, 1).reshape(d_out, n * r)
    a_side = a.permute(2, 0, 1).reshape(d_in, n * r)
    total = float(torch.einsum("nij,nji->", b.transpose(1, 2) @ b, a @ a.transpose(1, 2)))
    if init is not None:
        u, v = init.u.to(a)[:, :c], init.v.to(a)[:, :c]
    else:
        u, v = None, _leading(_Gram(a_side, b.transpose(1, 2) @ b), c, None)
    av = a @ v  # (n, r, c)
    energy, done = 0.0, 0
    while done < iterations:
        done += 1
        u = _leading(_Gram(b_side, av @ av.transpose(1, 2)), c, u)
        btu = b.transpose(1, 2) @ u  # (n, r, c)
        v = _leading(_Gram(a_side, btu @ btu.transpose(1, 2)), c, v)
        av = a @ v
        gained = float((btu.transpose(1, 2) @ av).pow(2).sum())
        if gained - energy <= JOINT_TOLERANCE * max(gained, 1e-300):
            energy = gained
            break
        energy = gained
    return JointBasis(u.to(torch.float32), v.to(torch.float32), energy, total, done)


class _Gram:
    """sum_i F_i M_i F_i^T (d x d) for factors side by side f (d, n r) and PSD weights m (n, r, r),
    applied to blocks without being formed."""

    def __init__(self, f: torch.Tensor, m: torch.Tensor):
        self.f, self.m = f, m

    def _weighted(self, z: torch.Tensor) -> torch.Tensor:
        n, r, _ = self.m.shape
        return (self.m @ z.view(n, r, -1)).view(n * r, -1)

    def apply(self, p: torch.Tensor) -> torch.Tensor:
        return self.f @ self._weighted(self.f.T @ p)

    def quadratic(self, p: torch.Tensor) -> torch.Tensor:
        """p^T G p."""
        z = self.f.T @ p
        return z.T @ self._weighted(z)

    def dense(self) -> torch.Tensor:
        return self.apply(torch.eye(self.f.shape[0], dtype=self.f.dtype, device=self.f.device))


def joint_cores(
    basis: JointBasis, a: torch.Tensor, b: torch.Tensor, q: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Q (n, q, c), P (n, c, q), relative delta-W error (n,), ||B A|| (n,)) of each adapter on the bases: the
    best rank-q factors of its core U^T B A V, balanced and sign-fixed (so they depend on
    dW alone). The error is exact, from the Pythagorean split of dW - U C V^T into what the bases
    miss and what truncating the core to q drops, both in float64."""
    u, v = basis.u.to(torch.float64), basis.v.to(torch.float64)
    a, b = a.to(torch.float64), b.to(torch.float64)
    core_a, core_b, s = canonical_factors(a @ v, u.T @ b)  # (n, r, c), (n, c, r), (n, r)
    q = min(q, s.shape[1])
    norm2 = torch.einsum("nij,nji->n", b.transpose(1, 2) @ b, a @ a.transpose(1, 2))
    captured = s.pow(2).sum(dim=1)
    kept = s[:, :q].pow(2).sum(dim=1)
    error2 = (norm2 - captured).clamp_min(0) + (captured - kept)
    error = torch.where(norm2 > 0, (error2 / norm2.clamp_min(1e-300)).sqrt(), error2.sqrt())
    return core_a[:, :q].to(torch.float32), core_b[:, :, :q].to(torch.float32), error, norm2.sqrt()


def core_rank_errors(basis: JointBasis, a: torch.Tensor, b: torch.Tensor, widths: dict[int, int]) -> dict[int, float]:
    """Mean relative delta-W error of each candidate (core rank q -> width c) on the leading c
    columns of the bases: one float64 product of the factors with the bases, sliced per candidate;
    the core's singular values from r x r factors (thin QRs), as joint_cores splits the error."""
    u, v = basis.u.to(torch.float64), basis.v.to(torch.float64)
    a, b = a.to(torch.float64), b.to(torch.float64)
    av, utb = a @ v, u.T @ b  # (n, r, C), (n, C, r)
    norm2 = torch.einsum("nij,nji->n", b.transpose(1, 2) @ b, a @ a.transpose(1, 2))
    errors = {}
    for q, c in widths.items():
        rb = torch.linalg.qr(utb[:, :c], mode="r").R
        ra = torch.linalg.qr(av[:, :, :c].transpose(1, 2), mode="r").R
        s = torch.linalg.svdvals(rb @ ra.transpose(1, 2))
        error2 = (norm2 - s.pow(2).sum(dim=1)).clamp_min(0) + s[:, q:].pow(2).sum(dim=1)
        errors[q] = float(torch.where(norm2 > 0, (error2 / norm2.clamp_min(1e-300)).sqrt(), error2.sqrt()).mean())
    return errors


def joint_rebuild(
    basis: JointBasis, core_a: torch.Tensor, core_b: torch.Tensor, rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Standard LoRA factors A' (n, rank, d_in) = Q V^T and B' (n, d_out, rank) = U P, zero-padded
    from q to the adapter's rank so its config stays valid."""
    return pad_rank(core_a @ basis.v.T, basis.u @ core_b, rank)


def cut_rank(a: torch.Tensor, b: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The best rank-`rank` factors (n, rank, d_in), (n, d_out, rank) of each B A (a zero-padded
    adapter rebuilt at a collection's larger rank, cut back to its own), float32."""
    a_hat, b_hat, _ = canonical_factors(a, b)
    return a_hat[:, :rank].to(torch.float32), b_hat[:, :, :rank].to(torch.float32)


def _leading(gram: _Gram, count: int, previous: torch.Tensor | None) -> torch.Tensor:
    """Orthonormal columns spanning the top `count` eigenvectors of the Gram: the best `count`
    columns within span(P, G P), P = `previous` (or a seeded random range of G), by Rayleigh-Ritz
    on the 2 count-wide block: never worse than P, and exact once the alternating fit has
    converged. Exact (G formed, d x d) when count is near d."""
    d = gram.f.shape[0]
    if 2 * count >= d:
        return _top(gram.dense(), count)
    if previous is None:
        probe = torch.randn(d, count, generator=torch.Generator().manual_seed(0), dtype=gram.f.dtype).to(gram.f.device)
        previous = torch.linalg.qr(gram.apply(probe)).Q
    block = torch.linalg.qr(torch.cat([previous, gram.apply(previous)], dim=1)).Q  # (d, 2 count)
    return block @ _top(gram.quadratic(block), count)


def _top(square: torch.Tensor, count: int) -> torch.Tensor:
    """Top `count` eigenvectors (columns) of a symmetric PSD float64 matrix (only those computed:
    LAPACK's MRRR through scipy, on the CPU)."""
    n = square.shape[0]
    if square.device.type != "cpu":
        return torch.linalg.eigh(square)[1][:, -count:].flip(1)
    _, vectors = scipy.linalg.eigh(square.numpy(), subset_by_index=[n - count, n - 1], driver="evr")
    return torch.from_numpy(vectors).flip(1).contiguous()
