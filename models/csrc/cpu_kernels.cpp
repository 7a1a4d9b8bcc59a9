// The models' CPU kernels (models/_cpu_kernels.py builds and loads this file): the fused multi-step LIF / IF, one
// pass over the data per direction (models/lif_fused.py documents the equations), BatchNorm's training forward on
// contiguous NCHW batches (BatchNormForward), and BatchNorm followed by the neuron as one op (BnLifForward and
// BnLifBackward; models/bn_neuron.py documents the equations).
//
// LIF: every operand is addressed as base + t * t_stride + i, i in [0, M): each time step is one dense block of M
// elements in the same physical order in every operand (the Python side guarantees it). Outputs are dense
// sequences (time stride M); an input may have any time stride, 0 included (a sequence broadcast over T).
//
// Forward reads x once and writes the spikes and the charged potential h once; backward reads g_s and h once
// and writes g_x once (PLIF's backward also reads the previous step's h, from cache, for the rate's gradient).
// The membrane (forward) and the gradient reaching it (backward) stay in a small block buffer across the T
// steps, so the inner loops run over consecutive elements and vectorise.
//
// Rounding follows the vectorised torch path the Python side falls back to (torch.lerp's and torch.add(alpha=)'s
// fused multiply-adds, written as std::fma; -ffp-contract=off keeps everything else as written), so the spikes
// and h equal that path's except where an FMA-less build of torch rounds differently.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include <ATen/Parallel.h>

extern "C" {

// The neuron, as models/_cpu_kernels.py's _Spec lays it out.
struct LifSpec {
    int32_t charge;        // 0: LIF with decay_input, 1: LIF without, 2: IF
    int32_t hard_reset;    // v_reset is a number (else soft reset: subtract the threshold)
    int32_t detach_reset;  // the reset passes no gradient through the spike
    int32_t surrogate;     // 0: atan, 1: sigmoid, 2: rect
    double tau;
    double v_threshold;
    double v_reset;  // 0 when soft
    double alpha;    // the surrogate's
    int32_t learnable;  // PLIF: the rate is `rate` (its sigmoid(w), as the tensor holds it), not 1 / tau, and
                        // backward also sums the rate's gradient
    double rate;
};

}  // extern "C"

namespace {

constexpr int64_t kBlock = 512;      // elements per block: the block buffer stays in L1
constexpr int64_t kPerThread = 1 << 15;  // fewer elements than this per thread: not worth another thread

// torch.lerp(start, end, w) as torch's vectorised CPU kernel computes it.
template <typename T>
inline T lerp(T start, T end, T w) {
    return std::abs(w) < T(0.5) ? std::fma(w, end - start, start) : std::fma(w - T(1), end - start, end);
}

// sg(d), d = h - v_threshold, in the operation order of lif_fused._surrogate_ (c2 = (pi / 2 alpha)^2).
template <int Kind, typename T>
inline T surrogate(T d, T alpha, T c2, T half_width) {
    if constexpr (Kind == 0) {
        return T(1) / (d * d * c2 + T(1)) * (alpha / T(2));
    } else if constexpr (Kind == 1) {
        const T s = T(1) / (T(1) + std::exp(-(d * alpha)));
        return s * (T(1) - s) * alpha;
    } else {
        return std::abs(d) < half_width ? alpha : T(0);
    }
}

// The membrane after the reset, from the stored h and its spike s (0 or 1): forward's, and PLIF backward's
// recomputation of it.
template <bool Hard, typename T>
inline T reset_membrane(T h, T s, T vr, T thr) {
    if constexpr (Hard) return s != T(0) ? vr : h;
    else return h - s * thr;
}

// The neuron's numbers in T: LIF's torch.add alpha and v_reset / tau rounded as torch rounds the numbers it is
// given; PLIF's the tensor rate's arithmetic, in T as torch does it.
template <typename T>
struct LifConsts {
    int charge;
    bool hard, learnable, shifted;
    T k, keep, vr, thr, vr_k;

    explicit LifConsts(const LifSpec& spec)
        : charge(spec.charge),
          hard(spec.hard_reset != 0),
          learnable(spec.learnable != 0),
          shifted(spec.v_reset != 0.0 && spec.hard_reset),
          k(learnable ? T(spec.rate) : T(1.0 / spec.tau)),
          keep(learnable ? T(1) - k : T(1.0 - 1.0 / spec.tau)),
          vr(T(spec.v_reset)),
          thr(T(spec.v_threshold)),
          vr_k(learnable ? vr * k : T(spec.v_reset * (1.0 / spec.tau))) {}
};

// Charge one block of one step: hs = the potential charged by xs from v (from rest where !have_v). The branches
// are the same for the whole block, so each case is its own loop and vectorises.
template <typename T>
inline void charge_block(const LifConsts<T>& c, const T* xs, const T* v, bool have_v, T* hs, int64_t n) {
    if (c.charge == 2) {
        if (have_v) for (int64_t j = 0; j < n; ++j) hs[j] = xs[j] + v[j];
        else std::copy(xs, xs + n, hs);
    } else if (c.charge == 0) {
        if (have_v && c.shifted) for (int64_t j = 0; j < n; ++j) hs[j] = lerp(v[j], xs[j] + c.vr, c.k);
        else if (have_v) for (int64_t j = 0; j < n; ++j) hs[j] = lerp(v[j], xs[j], c.k);
        else if (c.shifted) for (int64_t j = 0; j < n; ++j) hs[j] = (xs[j] + c.vr) * c.k;
        else for (int64_t j = 0; j < n; ++j) hs[j] = xs[j] * c.k;
    } else {
        if (have_v && c.learnable) for (int64_t j = 0; j < n; ++j) hs[j] = v[j] * c.keep + xs[j];
        else if (have_v) for (int64_t j = 0; j < n; ++j) hs[j] = std::fma(v[j], c.keep, xs[j]);
        else std::copy(xs, xs + n, hs);
        if (c.shifted) for (int64_t j = 0; j < n; ++j) hs[j] = hs[j] + c.vr_k;
    }
}

// Fire and reset one block of one step: ss = the spikes of hs, v = the membrane after the reset.
template <typename T>
inline void fire_block(const LifConsts<T>& c, const T* hs, T* ss, T* v, int64_t n) {
    const T thr = c.thr, vr = c.vr;  // locals: a store through ss or v might otherwise alias c
    if (c.hard) {
        for (int64_t j = 0; j < n; ++j) {
            const T s = hs[j] >= thr ? T(1) : T(0);
            ss[j] = s;
            v[j] = reset_membrane<true>(hs[j], s, vr, thr);
        }
    } else {  // two loops: GCC 12 did not vectorise the soft reset fused with the fire
        for (int64_t j = 0; j < n; ++j) ss[j] = hs[j] >= thr ? T(1) : T(0);
        for (int64_t j = 0; j < n; ++j) v[j] = reset_membrane<false>(hs[j], ss[j], vr, thr);
    }
}

template <typename T>
struct Forward {
    const T* x;
    int64_t x_step;
    const T* v0;  // nullptr: zeros
    T* spikes;
    T* h;
    T* v_last;
    int64_t steps;
    int64_t m;
    LifSpec spec;

    void operator()(int64_t lo, int64_t hi) const {
        const LifConsts<T> c(spec);
        T v[kBlock];
        for (int64_t b0 = lo; b0 < hi; b0 += kBlock) {
            const int64_t n = std::min(kBlock, hi - b0);
            bool have_v = v0 != nullptr;
            if (have_v) std::copy(v0 + b0, v0 + b0 + n, v);
            for (int64_t t = 0; t < steps; ++t) {
                T* hs = h + t * m + b0;
                charge_block(c, x + t * x_step + b0, v, have_v, hs, n);
                fire_block(c, hs, spikes + t * m + b0, v, n);
                have_v = true;
            }
            std::copy(v, v + n, v_last + b0);
        }
    }
};

// One time step of backward over a block: g (the carry into step t) becomes the carry into step t - 1; g_h
// also goes to gh where that is not null (PLIF's rate gradient needs it).
template <int Kind, bool Hard, bool Detach, typename T>
void backward_step(const T* hs, const T* gs, T* gx, T* g, T* gh_out, int64_t n, T a, T b, T thr, T vr, T alpha,
                   T c2, T half_width) {
    for (int64_t j = 0; j < n; ++j) {
        const T hv = hs[j];
        const T sg = surrogate<Kind>(hv - thr, alpha, c2, half_width);
        T dvdh;
        if constexpr (Hard) dvdh = (hv >= thr ? T(0) : T(1)) + (Detach ? T(0) : (vr - hv) * sg);
        else dvdh = Detach ? T(1) : T(1) - thr * sg;
        const T gh = g[j] * dvdh + gs[j] * sg;
        gx[j] = gh * b;
        g[j] = gh * a;
        if (gh_out != nullptr) gh_out[j] = gh;
    }
}

template <typename T>
using StepFn = void (*)(const T*, const T*, T*, T*, T*, int64_t, T, T, T, T, T, T, T);

template <typename T, int Kind>
StepFn<T> pick_step(bool hard, bool detach) {
    if (hard) return detach ? backward_step<Kind, true, true, T> : backward_step<Kind, true, false, T>;
    return detach ? backward_step<Kind, false, true, T> : backward_step<Kind, false, false, T>;
}

template <typename T>
StepFn<T> pick_step(const LifSpec& spec) {
    const bool hard = spec.hard_reset, detach = spec.detach_reset;
    if (spec.surrogate == 0) return pick_step<T, 0>(hard, detach);
    if (spec.surrogate == 1) return pick_step<T, 1>(hard, detach);
    return pick_step<T, 2>(hard, detach);
}

// PLIF: sum_j g_h * dh/dk over one step of a block, in double. dh/dk = (h - v_prev) / k with decay_input, else
// v_reset - v_prev, v_prev the membrane the step charged from: the previous step's reset of its h (hp), as forward
// computed it, or at step 0 the initial membrane (v0; nullptr with hp: zeros).
template <typename T>
double rate_term(const LifConsts<T>& c, const T* hs, const T* hp, const T* v0, const T* gh, int64_t n) {
    double acc = 0;
    for (int64_t j = 0; j < n; ++j) {
        T vp = T(0);
        if (hp != nullptr) {
            const T s = hp[j] >= c.thr ? T(1) : T(0);
            vp = c.hard ? reset_membrane<true>(hp[j], s, c.vr, c.thr) : reset_membrane<false>(hp[j], s, c.vr, c.thr);
        } else if (v0 != nullptr) {
            vp = v0[j];
        }
        const T dh_dk = c.charge == 0 ? (hs[j] - vp) / c.k : c.vr - vp;
        acc += double(gh[j]) * double(dh_dk);
    }
    return acc;
}

// The backward's numbers: the carry's factor a, x's factor b, and the surrogate's.
template <typename T>
struct BackConsts {
    T a, b, thr, vr, alpha, c2, half_width;

    explicit BackConsts(const LifSpec& spec) {
        const LifConsts<T> c(spec);
        a = c.charge == 2 ? T(1) : c.keep;
        b = c.charge == 0 ? c.k : T(1);
        thr = c.thr;
        vr = c.vr;
        alpha = T(spec.alpha);
        const double cc = M_PI / 2 * spec.alpha;
        c2 = T(cc * cc);
        half_width = T(0.5 / spec.alpha);
    }
};

template <typename T>
struct Backward {
    const T* g_s;
    int64_t gs_step;
    const T* g_v;  // nullptr: no gradient reaches the final membrane
    const T* h;
    T* g_x;
    T* g_v0;
    int64_t steps;
    int64_t m;
    LifSpec spec;
    const T* v0;         // PLIF: forward's initial membrane (nullptr: zeros)
    double* g_rate;      // PLIF: one partial sum of the rate's gradient per block (m / kBlock, rounded up)

    void operator()(int64_t lo, int64_t hi) const {
        const StepFn<T> step = pick_step<T>(spec);
        const LifConsts<T> c(spec);
        const BackConsts<T> bc(spec);
        T g[kBlock];  // the gradient reaching the membrane after step t, times a
        T gh[kBlock];  // PLIF: step t's g_h
        for (int64_t b0 = lo; b0 < hi; b0 += kBlock) {
            const int64_t n = std::min(kBlock, hi - b0);
            if (g_v != nullptr) std::copy(g_v + b0, g_v + b0 + n, g);
            else std::fill(g, g + n, T(0));
            double rate_acc = 0;
            for (int64_t t = steps - 1; t >= 0; --t) {
                const T* hs = h + t * m + b0;
                step(hs, g_s + t * gs_step + b0, g_x + t * m + b0, g, c.learnable ? gh : nullptr, n, bc.a, bc.b, bc.thr,
                     bc.vr, bc.alpha, bc.c2, bc.half_width);
                if (c.learnable)
                    rate_acc += rate_term(c, hs, t > 0 ? hs - m : nullptr, v0 != nullptr ? v0 + b0 : nullptr, gh, n);
            }
            std::copy(g, g + n, g_v0 + b0);
            if (c.learnable) g_rate[b0 / kBlock] = rate_acc;
        }
    }
};

// Run body over [0, m) on torch's intra-op threads (its OpenMP pool: this file is built with -fopenmp against
// the libgomp torch loaded), in chunks of whole blocks, at least kPerThread elements each.
template <typename Body>
void parallel(const Body& body, int64_t m) {
    const int64_t blocks = (m + kBlock - 1) / kBlock;
    at::parallel_for(0, blocks, kPerThread / kBlock, [&](int64_t lo, int64_t hi) {
        body(lo * kBlock, std::min(m, hi * kBlock));
    });
}

template <typename T>
struct Vec32;  // 32 bytes of T as one GCC / Clang vector
template <>
struct Vec32<float> {
    typedef float type __attribute__((vector_size(32)));
};
template <>
struct Vec32<double> {
    typedef double type __attribute__((vector_size(32)));
};

// A sum of many values (Squares: of (value - shift)^2) in double, added span by span. Summed in four independent
// vector accumulators of T, flushed to double every kFlush vectors per accumulator (so each lane sums a few dozen
// terms in T), and the few values past the last whole vector of a span in double. One accumulator is a serial
// chain of dependent adds, converting each value to double halves the vector width, and the compilers vectorised
// a plain lane-array loop poorly (shuffles on every step), hence the vector types.
template <bool Squares, typename T>
struct SpanSum {
    using V = typename Vec32<T>::type;
    static constexpr int64_t kW = 32 / sizeof(T);
    static constexpr int64_t kFlush = 32;
    V acc[4] = {};
    int64_t pending = 0;  // vectors added to acc[0] since the last flush
    double total = 0;
    T shift;

    explicit SpanSum(T s) : shift(s) {}

    inline V load(const T* p) const {
        V v;
        std::memcpy(&v, p, sizeof(V));
        if constexpr (Squares) {
            v -= shift;
            return v * v;
        }
        return v;
    }

    inline void add(const T* p, int64_t n) {
        int64_t j = 0;
        for (; j + 4 * kW <= n; j += 4 * kW) {
            for (int u = 0; u < 4; ++u) acc[u] += load(p + j + u * kW);
            if (++pending == kFlush) flush();
        }
        for (; j + kW <= n; j += kW) {
            acc[0] += load(p + j);
            if (++pending == kFlush) flush();
        }
        for (; j < n; ++j) {
            const T d = Squares ? p[j] - shift : p[j];
            total += double(Squares ? d * d : d);
        }
    }

    inline void flush() {
        const V a = (acc[0] + acc[1]) + (acc[2] + acc[3]);
        T lanes[kW];
        std::memcpy(lanes, &a, sizeof(V));
        for (int64_t k = 0; k < kW; ++k) total += double(lanes[k]);
        for (auto& v : acc) v = V{};
        pending = 0;
    }

    inline double result() {
        flush();
        return total;
    }
};

// BatchNorm's training forward on a contiguous NCHW batch, per channel: mean and biased variance summed to double
// (SpanSum; two passes, the second over data the first left in cache; torch's CPU kernel takes ~4x as long for
// these), the running statistics' update, then y = x * alpha + beta with alpha = invstd * weight, beta = bias -
// mean * alpha (torch's CPU kernel's formulas). With y null, only the statistics (and, where save_scale is not
// null, alpha and beta: the fused BatchNorm + neuron applies them itself).
template <typename T>
struct BatchNormForward {
    const T* x;
    const T* weight;  // nullptr: 1
    const T* bias;    // nullptr: 0
    T* running_mean;  // nullptr: not tracked
    T* running_var;
    T* y;  // nullptr: statistics only
    T* save_mean;
    T* save_invstd;
    int64_t n, c, hw;
    double eps, momentum;
    T* save_var = nullptr;    // the biased variance, where not null
    T* save_scale = nullptr;  // the affine y = x * scale + shift, where not null
    T* save_shift = nullptr;

    // sum over the channel of x (Squares: of (x - shift)^2) in double (SpanSum)
    template <bool Squares>
    double channel_sum(int64_t ch, double shift) const {
        SpanSum<Squares, T> sum{T(shift)};
        for (int64_t i = 0; i < n; ++i) sum.add(x + (i * c + ch) * hw, hw);
        return sum.result();
    }

    void operator()(int64_t c_lo, int64_t c_hi) const {
        const int64_t count = n * hw;
        for (int64_t ch = c_lo; ch < c_hi; ++ch) {
            const double mean = channel_sum<false>(ch, 0.0) / double(count);
            const double sq = channel_sum<true>(ch, mean);
            const double var = sq / double(count);
            const double invstd = 1.0 / std::sqrt(var + eps);
            if (running_mean != nullptr) {
                const double unbiased = count > 1 ? sq / double(count - 1) : var;
                running_mean[ch] = T(momentum * mean + (1.0 - momentum) * double(running_mean[ch]));
                running_var[ch] = T(momentum * unbiased + (1.0 - momentum) * double(running_var[ch]));
            }
            save_mean[ch] = T(mean);
            save_invstd[ch] = T(invstd);
            if (save_var != nullptr) save_var[ch] = T(var);
            const double w = weight != nullptr ? double(weight[ch]) : 1.0;
            const double b = bias != nullptr ? double(bias[ch]) : 0.0;
            const T alpha = T(invstd * w), beta = T(b - mean * invstd * w);
            if (save_scale != nullptr) {
                save_scale[ch] = alpha;
                save_shift[ch] = beta;
            }
            if (y == nullptr) continue;
            for (int64_t i = 0; i < n; ++i) {
                const T* p = x + (i * c + ch) * hw;
                T* q = y + (i * c + ch) * hw;
                for (int64_t j = 0; j < hw; ++j) q[j] = p[j] * alpha + beta;
            }
        }
    }
};

// BatchNorm (y = x * scale + shift per channel) and then the neuron, as one op, on a contiguous [steps, m]
// sequence whose step is [N, C, hw]: only the spikes are written (y and h live in block buffers). Blocks run over
// the flat step as the LIF's do; each block's normalisation goes row by row (a row: hw elements of one channel).
template <typename T>
struct BnLifForward {
    const T* x;
    const T* scale;
    const T* shift;
    T* spikes;
    int64_t steps, m, c, hw;
    LifSpec spec;

    void operator()(int64_t lo, int64_t hi) const {
        const LifConsts<T> lc(spec);
        T y[kBlock], h[kBlock], v[kBlock];
        for (int64_t b0 = lo; b0 < hi; b0 += kBlock) {
            const int64_t n = std::min(kBlock, hi - b0);
            for (int64_t t = 0; t < steps; ++t) {
                const T* xs = x + t * m + b0;
                for (int64_t j = 0; j < n;) {
                    const int64_t row = (b0 + j) / hw, end = std::min(n, (row + 1) * hw - b0);
                    const T a = scale[row % c], b = shift[row % c];
                    for (int64_t i = j; i < end; ++i) y[i] = xs[i] * a + b;
                    j = end;
                }
                charge_block(lc, y, v, t > 0, h, n);
                fire_block(lc, h, spikes + t * m + b0, v, n);
            }
        }
    }
};

// Elements of x per channel group in BnLifBackward: a group's x and g_x (128 KiB each in float32) stay in L2
// between the first pass over them and the last.
constexpr int64_t kGroup = 1 << 15;

// Backward of BnLifForward, by groups of consecutive channels (BatchNorm's gradient needs each channel's sums). A
// group's rows at one (step, image) are one contiguous span of its channels' hw elements each, walked in blocks
// with the per-channel numbers laid out along the span, so no loop is as short as a row (16 elements at 4x4).
// For each block the membrane of every step is recomputed from x into a [steps, kBlock] buffer, then the steps
// are walked back as the LIF's backward does, writing g_y into g_x and adding g_y and g_y * xhat to per-position
// sums over the steps and images; the channels' sums come from those, in double. Then, over the group still in
// cache, g_x = scale * (g_y - mean(g_y) - xhat * mean(g_y * xhat)) (batch statistics) or scale * g_y (running
// ones). Groups start at fixed channels and each runs whole on one thread, so the results do not depend on the
// thread count. g_s is dense like x.
template <typename T>
struct BnLifBackward {
    const T* g_s;
    const T* x;
    const T* scale;
    const T* shift;
    const T* mean;
    const T* invstd;
    T* g_x;
    double* sum_gy;       // per channel
    double* sum_gy_xhat;  // per channel
    double* g_rate;       // PLIF: per group, a partial sum of the rate's gradient
    int64_t steps, batch, c, hw, group;
    int32_t batch_stats;
    LifSpec spec;

    void operator()(int64_t g_lo, int64_t g_hi) const {
        const StepFn<T> step = pick_step<T>(spec);
        const LifConsts<T> lc(spec);
        const BackConsts<T> bc(spec);
        const int64_t m = batch * c * hw, cap = group * hw;
        std::vector<T> hbuf(steps * kBlock);
        // along the span: scale, shift, mean, invstd, then the sums of g_y and g_y * xhat, then for the last pass
        // mean(g_y) and mean(g_y * xhat)
        std::vector<T> lanes(8 * cap);
        T *sc = &lanes[0], *sh = sc + cap, *mu = sh + cap, *is = mu + cap, *ag = is + cap, *agx = ag + cap,
          *mg = agx + cap, *mgx = mg + cap;
        T y[kBlock], v[kBlock], s[kBlock], g[kBlock], gh[kBlock];
        for (int64_t gi = g_lo; gi < g_hi; ++gi) {
            const int64_t c0 = gi * group, nc = std::min(group, c - c0), span = nc * hw;
            for (int64_t k = 0; k < nc; ++k) {
                std::fill(sc + k * hw, sc + (k + 1) * hw, scale[c0 + k]);
                std::fill(sh + k * hw, sh + (k + 1) * hw, shift[c0 + k]);
                std::fill(mu + k * hw, mu + (k + 1) * hw, mean[c0 + k]);
                std::fill(is + k * hw, is + (k + 1) * hw, invstd[c0 + k]);
            }
            std::fill(ag, ag + span, T(0));
            std::fill(agx, agx + span, T(0));
            double rate_acc = 0;
            for (int64_t i = 0; i < batch; ++i) {
                const int64_t base = (i * c + c0) * hw;
                for (int64_t b0 = 0; b0 < span; b0 += kBlock) {
                    const int64_t n = std::min(kBlock, span - b0), at = base + b0;
                    const T *bsc = sc + b0, *bsh = sh + b0, *bmu = mu + b0, *bis = is + b0;
                    T *bag = ag + b0, *bagx = agx + b0;
                    for (int64_t t = 0; t < steps; ++t) {
                        const T* xs = x + t * m + at;
                        for (int64_t j = 0; j < n; ++j) y[j] = xs[j] * bsc[j] + bsh[j];
                        charge_block(lc, y, v, t > 0, &hbuf[t * kBlock], n);
                        fire_block(lc, &hbuf[t * kBlock], s, v, n);
                    }
                    std::fill(g, g + n, T(0));
                    for (int64_t t = steps - 1; t >= 0; --t) {
                        const T* hs = &hbuf[t * kBlock];
                        const T* xs = x + t * m + at;
                        T* gy = g_x + t * m + at;
                        step(hs, g_s + t * m + at, gy, g, lc.learnable ? gh : nullptr, n, bc.a, bc.b, bc.thr, bc.vr,
                             bc.alpha, bc.c2, bc.half_width);
                        if (lc.learnable)
                            rate_acc += rate_term(lc, hs, t > 0 ? hs - kBlock : nullptr, (const T*)nullptr, gh, n);
                        for (int64_t j = 0; j < n; ++j) {
                            bag[j] += gy[j];
                            bagx[j] += gy[j] * ((xs[j] - bmu[j]) * bis[j]);
                        }
                    }
                }
            }
            if (g_rate != nullptr) g_rate[gi] = rate_acc;
            const double count = double(steps * batch * hw);
            for (int64_t k = 0; k < nc; ++k) {
                SpanSum<false, T> a{T(0)}, b{T(0)};
                a.add(ag + k * hw, hw);
                b.add(agx + k * hw, hw);
                sum_gy[c0 + k] = a.result();
                sum_gy_xhat[c0 + k] = b.result();
                std::fill(mg + k * hw, mg + (k + 1) * hw, batch_stats ? T(sum_gy[c0 + k] / count) : T(0));
                std::fill(mgx + k * hw, mgx + (k + 1) * hw, batch_stats ? T(sum_gy_xhat[c0 + k] / count) : T(0));
            }
            for (int64_t t = 0; t < steps; ++t) {
                for (int64_t i = 0; i < batch; ++i) {
                    const int64_t at = t * m + (i * c + c0) * hw;
                    const T* xs = x + at;
                    T* gx = g_x + at;
                    if (batch_stats) {
                        for (int64_t j = 0; j < span; ++j)
                            gx[j] = (gx[j] - mg[j] - (xs[j] - mu[j]) * is[j] * mgx[j]) * sc[j];
                    } else {
                        for (int64_t j = 0; j < span; ++j) gx[j] = gx[j] * sc[j];
                    }
                }
            }
        }
    }
};

// Channels per BnLifBackward group (see kGroup).
inline int64_t channel_group(int64_t per_channel, int64_t c) {
    return std::min(c, std::max<int64_t>(1, kGroup / std::max<int64_t>(1, per_channel)));
}

// Channels per task: enough work (~64k elements) per task to be worth a thread.
inline int64_t channel_grain(int64_t per_channel) {
    return std::max<int64_t>(1, kPerThread * 2 / std::max<int64_t>(1, per_channel));
}

// Runs body(T{}) with T the kernels' type for dtype (0 float32, 1 float64): 0, or 1 for another dtype.
template <typename Body>
int by_dtype(int dtype, const Body& body) {
    if (dtype == 0) {
        body(float{});
    } else if (dtype == 1) {
        body(double{});
    } else {
        return 1;
    }
    return 0;
}

}  // namespace

extern "C" {

// Elements per block (PLIF's backward writes one partial sum per block).
int64_t danet_lif_block() { return kBlock; }

// Each entry point takes dtype (0 float32, 1 float64) first and returns 0, or 1 for an unknown dtype.

int danet_lif_forward(int dtype, const void* x, int64_t x_step, const void* v0, void* spikes, void* h,
                      void* v_last, int64_t steps, int64_t m, const LifSpec* spec) {
    return by_dtype(dtype, [&](auto zero) {
        using T = decltype(zero);
        parallel(Forward<T>{(const T*)x, x_step, (const T*)v0, (T*)spikes, (T*)h, (T*)v_last, steps, m, *spec}, m);
    });
}

// PLIF (spec->learnable): v0 is forward's initial membrane (or null), g_rate has danet_lif_block() per block
// partial sums of the rate's gradient (m / block, rounded up), in double.
int danet_lif_backward(int dtype, const void* g_s, int64_t gs_step, const void* g_v, const void* h, void* g_x,
                       void* g_v0, int64_t steps, int64_t m, const LifSpec* spec, const void* v0,
                       double* g_rate) {
    return by_dtype(dtype, [&](auto zero) {
        using T = decltype(zero);
        parallel(Backward<T>{(const T*)g_s, gs_step, (const T*)g_v, (const T*)h, (T*)g_x, (T*)g_v0, steps, m,
                             *spec, (const T*)v0, g_rate},
                 m);
    });
}

// BatchNorm2d's training forward on a contiguous NCHW x of shape [n, c, hw]; see BatchNormForward.
int danet_bn_forward(int dtype, const void* x, const void* weight, const void* bias, void* running_mean,
                     void* running_var, void* y, void* save_mean, void* save_invstd, int64_t n, int64_t c,
                     int64_t hw, double eps, double momentum) {
    return by_dtype(dtype, [&](auto zero) {
        using T = decltype(zero);
        at::parallel_for(0, c, channel_grain(n * hw),
                         BatchNormForward<T>{(const T*)x, (const T*)weight, (const T*)bias, (T*)running_mean,
                                             (T*)running_var, (T*)y, (T*)save_mean, (T*)save_invstd, n, c, hw, eps,
                                             momentum});
    });
}

// Batch statistics of a contiguous [n, c, hw] x per channel, as danet_bn_forward computes them, without writing
// y: mean, biased variance (var: null, not written) and 1 / sqrt(var + eps); the running statistics updated with
// momentum where running_mean is not null; and where scale is not null, the affine BatchNorm applies
// (y = x * scale + shift; weight or bias null: 1 or 0).
int danet_bn_stats(int dtype, const void* x, const void* weight, const void* bias, void* running_mean,
                   void* running_var, void* mean, void* var, void* invstd, void* scale, void* shift, int64_t n,
                   int64_t c, int64_t hw, double eps, double momentum) {
    return by_dtype(dtype, [&](auto zero) {
        using T = decltype(zero);
        BatchNormForward<T> f{(const T*)x, (const T*)weight, (const T*)bias, (T*)running_mean, (T*)running_var,
                              nullptr, (T*)mean, (T*)invstd, n, c, hw, eps, momentum};
        f.save_var = (T*)var;
        f.save_scale = (T*)scale;
        f.save_shift = (T*)shift;
        at::parallel_for(0, c, channel_grain(n * hw), f);
    });
}

// BatchNorm then the neuron on a contiguous [steps, batch, c, hw] x (BnLifForward): spikes only.
int danet_bn_lif_forward(int dtype, const void* x, const void* scale, const void* shift, void* spikes,
                         int64_t steps, int64_t batch, int64_t c, int64_t hw, const LifSpec* spec) {
    const int64_t m = batch * c * hw;
    return by_dtype(dtype, [&](auto zero) {
        using T = decltype(zero);
        parallel(BnLifForward<T>{(const T*)x, (const T*)scale, (const T*)shift, (T*)spikes, steps, m, c, hw, *spec},
                 m);
    });
}

// Its backward (BnLifBackward): g_x, and per channel in double the sums of g_y and g_y * xhat (BatchNorm's
// weight and bias gradients) and, for PLIF (g_rate not null), partial sums of the rate's gradient, one per channel
// group (at most c).
int danet_bn_lif_backward(int dtype, const void* g_s, const void* x, const void* scale, const void* shift,
                          const void* mean, const void* invstd, void* g_x, double* sum_gy, double* sum_gy_xhat,
                          double* g_rate, int64_t steps, int64_t batch, int64_t c, int64_t hw, int32_t batch_stats,
                          const LifSpec* spec) {
    const int64_t group = channel_group(steps * batch * hw, c), groups = (c + group - 1) / group;
    return by_dtype(dtype, [&](auto zero) {
        using T = decltype(zero);
        at::parallel_for(0, groups, 1,
                         BnLifBackward<T>{(const T*)g_s, (const T*)x, (const T*)scale, (const T*)shift,
                                          (const T*)mean, (const T*)invstd, (T*)g_x, sum_gy, sum_gy_xhat, g_rate,
                                          steps, batch, c, hw, group, batch_stats, *spec});
    });
}

}  // extern "C"
