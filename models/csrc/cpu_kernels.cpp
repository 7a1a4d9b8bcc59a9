// The models' CPU kernels (models/_cpu_kernels.py builds and loads this file): the fused multi-step LIF / IF, one
// pass over the data per direction (models/lif_fused.py documents the equations), and BatchNorm's training
// forward on contiguous NCHW batches (BatchNormForward, at the end).
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
    if (c.hard) {
        for (int64_t j = 0; j < n; ++j) {
            const T s = hs[j] >= c.thr ? T(1) : T(0);
            ss[j] = s;
            v[j] = reset_membrane<true>(hs[j], s, c.vr, c.thr);
        }
    } else {
        for (int64_t j = 0; j < n; ++j) {
            const T s = hs[j] >= c.thr ? T(1) : T(0);
            ss[j] = s;
            v[j] = reset_membrane<false>(hs[j], s, c.vr, c.thr);
        }
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

// BatchNorm's training forward on a contiguous NCHW batch, per channel: mean and biased variance in double (two
// passes, the second over data the first left in cache; torch's CPU kernel takes ~4x as long for these), the running statistics' update, then y = x * alpha +
// beta with alpha = invstd * weight, beta = bias - mean * alpha (torch's CPU kernel's formulas).
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
    T* save_var = nullptr;  // the biased variance, where not null

    // sum over the channel of x (or of (x - shift)^2), in kLanes independent double accumulators: a single
    // accumulator is one serial chain of dependent adds (floating-point sums are not reordered unless written so)
    double channel_sum(int64_t ch, double shift, bool squares) const {
        constexpr int kLanes = 8;
        double acc[kLanes] = {};
        for (int64_t i = 0; i < n; ++i) {
            const T* p = x + (i * c + ch) * hw;
            int64_t j = 0;
            for (; j + kLanes <= hw; j += kLanes) {
                for (int k = 0; k < kLanes; ++k) {
                    const double d = double(p[j + k]) - shift;
                    acc[k] += squares ? d * d : d;
                }
            }
            for (; j < hw; ++j) {
                const double d = double(p[j]) - shift;
                acc[0] += squares ? d * d : d;
            }
        }
        double total = 0;
        for (int k = 0; k < kLanes; ++k) total += acc[k];
        return total;
    }

    void operator()(int64_t c_lo, int64_t c_hi) const {
        const int64_t count = n * hw;
        for (int64_t ch = c_lo; ch < c_hi; ++ch) {
            const double mean = channel_sum(ch, 0.0, false) / double(count);
            const double sq = channel_sum(ch, mean, true);
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
            if (y == nullptr) continue;
            const double w = weight != nullptr ? double(weight[ch]) : 1.0;
            const double b = bias != nullptr ? double(bias[ch]) : 0.0;
            const T alpha = T(invstd * w), beta = T(b - mean * invstd * w);
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

// Sums of g and of g * (x - mean) * invstd over n elements, into kLanes double accumulators each.
template <typename T>
inline void grad_sums(const T* g, const T* x, T mean, T invstd, int64_t n, double* sg, double* sgx) {
    constexpr int kLanes = 8;
    int64_t j = 0;
    for (; j + kLanes <= n; j += kLanes) {
        for (int k = 0; k < kLanes; ++k) {
            const T xhat = (x[j + k] - mean) * invstd;
            sg[k] += double(g[j + k]);
            sgx[k] += double(g[j + k]) * double(xhat);
        }
    }
    for (; j < n; ++j) {
        sg[0] += double(g[j]);
        sgx[0] += double(g[j]) * double((x[j] - mean) * invstd);
    }
}

// Backward of BnLifForward, per channel (BatchNorm's gradient needs the channel's sums): for each block of a
// row, the membrane of every step is recomputed from x into a [steps, kBlock] buffer, then the steps are walked
// back as the LIF's backward does, writing g_y into g_x and summing g_y and g_y * xhat; then, over the channel's
// rows still in cache, g_x = scale * (g_y - mean(g_y) - xhat * mean(g_y * xhat)) (batch statistics) or
// scale * g_y (running ones). g_s is dense like x.
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
    double* g_rate;       // PLIF: per channel, the rate's gradient
    int64_t steps, batch, c, hw;
    int32_t batch_stats;
    LifSpec spec;

    void operator()(int64_t c_lo, int64_t c_hi) const {
        const StepFn<T> step = pick_step<T>(spec);
        const LifConsts<T> lc(spec);
        const BackConsts<T> bc(spec);
        const int64_t m = batch * c * hw;
        std::vector<T> hbuf(steps * kBlock);
        T y[kBlock], v[kBlock], s[kBlock], g[kBlock], gh[kBlock];
        for (int64_t ch = c_lo; ch < c_hi; ++ch) {
            const T sc = scale[ch], sh = shift[ch], mu = mean[ch], is = invstd[ch];
            double sg[8] = {}, sgx[8] = {}, rate_acc = 0;
            for (int64_t i = 0; i < batch; ++i) {
                const int64_t row = (i * c + ch) * hw;
                for (int64_t b0 = 0; b0 < hw; b0 += kBlock) {
                    const int64_t n = std::min(kBlock, hw - b0), at = row + b0;
                    for (int64_t t = 0; t < steps; ++t) {
                        const T* xs = x + t * m + at;
                        for (int64_t j = 0; j < n; ++j) y[j] = xs[j] * sc + sh;
                        charge_block(lc, y, v, t > 0, &hbuf[t * kBlock], n);
                        fire_block(lc, &hbuf[t * kBlock], s, v, n);
                    }
                    std::fill(g, g + n, T(0));
                    for (int64_t t = steps - 1; t >= 0; --t) {
                        const T* hs = &hbuf[t * kBlock];
                        T* gy = g_x + t * m + at;
                        step(hs, g_s + t * m + at, gy, g, lc.learnable ? gh : nullptr, n, bc.a, bc.b, bc.thr, bc.vr,
                             bc.alpha, bc.c2, bc.half_width);
                        if (lc.learnable) rate_acc += rate_term(lc, hs, t > 0 ? hs - kBlock : nullptr, (const T*)nullptr, gh, n);
                        grad_sums(gy, x + t * m + at, mu, is, n, sg, sgx);
                    }
                }
            }
            double total_g = 0, total_gx = 0;
            for (int k = 0; k < 8; ++k) total_g += sg[k], total_gx += sgx[k];
            sum_gy[ch] = total_g;
            sum_gy_xhat[ch] = total_gx;
            if (g_rate != nullptr) g_rate[ch] = rate_acc;
            const double count = double(steps * batch * hw);
            const T mg = batch_stats ? T(total_g / count) : T(0), mgx = batch_stats ? T(total_gx / count) : T(0);
            for (int64_t t = 0; t < steps; ++t) {
                for (int64_t i = 0; i < batch; ++i) {
                    const int64_t at = t * m + (i * c + ch) * hw;
                    const T* xs = x + at;
                    T* gx = g_x + at;
                    if (batch_stats) {
                        for (int64_t j = 0; j < hw; ++j) gx[j] = (gx[j] - mg - (xs[j] - mu) * is * mgx) * sc;
                    } else {
                        for (int64_t j = 0; j < hw; ++j) gx[j] = gx[j] * sc;
                    }
                }
            }
        }
    }
};

// Channels per task: enough work (~64k elements) per task to be worth a thread.
inline int64_t channel_grain(int64_t per_channel) {
    return std::max<int64_t>(1, kPerThread * 2 / std::max<int64_t>(1, per_channel));
}

}  // namespace

extern "C" {

// Elements per block (PLIF's backward writes one partial sum per block).
int64_t danet_lif_block() { return kBlock; }

// dtype: 0 float32, 1 float64. Returns 0, or 1 for an unknown dtype.
int danet_lif_forward(int dtype, const void* x, int64_t x_step, const void* v0, void* spikes, void* h,
                      void* v_last, int64_t steps, int64_t m, const LifSpec* spec) {
    if (dtype == 0) {
        Forward<float> f{(const float*)x, x_step, (const float*)v0, (float*)spikes, (float*)h, (float*)v_last,
                         steps, m, *spec};
        parallel(f, m);
    } else if (dtype == 1) {
        Forward<double> f{(const double*)x, x_step, (const double*)v0, (double*)spikes, (double*)h,
                          (double*)v_last, steps, m, *spec};
        parallel(f, m);
    } else {
        return 1;
    }
    return 0;
}

// PLIF (spec->learnable): v0 is forward's initial membrane (or null), g_rate has danet_lif_block() per block
// partial sums of the rate's gradient (m / block, rounded up), in double.
int danet_lif_backward(int dtype, const void* g_s, int64_t gs_step, const void* g_v, const void* h, void* g_x,
                       void* g_v0, int64_t steps, int64_t m, const LifSpec* spec, const void* v0,
                       double* g_rate) {
    if (dtype == 0) {
        Backward<float> f{(const float*)g_s, gs_step, (const float*)g_v, (const float*)h, (float*)g_x,
                          (float*)g_v0, steps, m, *spec, (const float*)v0, g_rate};
        parallel(f, m);
    } else if (dtype == 1) {
        Backward<double> f{(const double*)g_s, gs_step, (const double*)g_v, (const double*)h, (double*)g_x,
                           (double*)g_v0, steps, m, *spec, (const double*)v0, g_rate};
        parallel(f, m);
    } else {
        return 1;
    }
    return 0;
}

}  // extern "C"

extern "C" {

// BatchNorm2d's training forward on a contiguous NCHW x of shape [n, c, hw]; see BatchNormForward.
int danet_bn_forward(int dtype, const void* x, const void* weight, const void* bias, void* running_mean,
                     void* running_var, void* y, void* save_mean, void* save_invstd, int64_t n, int64_t c,
                     int64_t hw, double eps, double momentum) {
    const int64_t grain = channel_grain(n * hw);
    if (dtype == 0) {
        BatchNormForward<float> f{(const float*)x, (const float*)weight, (const float*)bias, (float*)running_mean,
                                  (float*)running_var, (float*)y, (float*)save_mean, (float*)save_invstd, n, c, hw,
                                  eps, momentum};
        at::parallel_for(0, c, grain, f);
    } else if (dtype == 1) {
        BatchNormForward<double> f{(const double*)x, (const double*)weight, (const double*)bias,
                                   (double*)running_mean, (double*)running_var, (double*)y, (double*)save_mean,
                                   (double*)save_invstd, n, c, hw, eps, momentum};
        at::parallel_for(0, c, grain, f);
    } else {
        return 1;
    }
    return 0;
}

}  // extern "C"

extern "C" {

// Batch statistics of a contiguous [n, c, hw] x per channel: mean, biased variance and 1 / sqrt(var + eps), as
// danet_bn_forward computes them, nothing else written.
int danet_bn_stats(int dtype, const void* x, void* mean, void* var, void* invstd, int64_t n, int64_t c, int64_t hw,
                   double eps) {
    if (dtype == 0) {
        BatchNormForward<float> f{(const float*)x, nullptr, nullptr, nullptr, nullptr, nullptr, (float*)mean,
                                  (float*)invstd, n, c, hw, eps, 0.0, (float*)var};
        at::parallel_for(0, c, channel_grain(n * hw), f);
    } else if (dtype == 1) {
        BatchNormForward<double> f{(const double*)x, nullptr, nullptr, nullptr, nullptr, nullptr, (double*)mean,
                                   (double*)invstd, n, c, hw, eps, 0.0, (double*)var};
        at::parallel_for(0, c, channel_grain(n * hw), f);
    } else {
        return 1;
    }
    return 0;
}

// BatchNorm then the neuron on a contiguous [steps, batch, c, hw] x (BnLifForward): spikes only.
int danet_bn_lif_forward(int dtype, const void* x, const void* scale, const void* shift, void* spikes,
                         int64_t steps, int64_t batch, int64_t c, int64_t hw, const LifSpec* spec) {
    const int64_t m = batch * c * hw;
    if (dtype == 0) {
        BnLifForward<float> f{(const float*)x, (const float*)scale, (const float*)shift, (float*)spikes, steps, m, c,
                              hw, *spec};
        parallel(f, m);
    } else if (dtype == 1) {
        BnLifForward<double> f{(const double*)x, (const double*)scale, (const double*)shift, (double*)spikes, steps,
                               m, c, hw, *spec};
        parallel(f, m);
    } else {
        return 1;
    }
    return 0;
}

// Its backward (BnLifBackward): g_x, and per channel in double the sums of g_y and g_y * xhat (BatchNorm's
// weight and bias gradients) and, for PLIF (g_rate not null), the rate's gradient.
int danet_bn_lif_backward(int dtype, const void* g_s, const void* x, const void* scale, const void* shift,
                          const void* mean, const void* invstd, void* g_x, double* sum_gy, double* sum_gy_xhat,
                          double* g_rate, int64_t steps, int64_t batch, int64_t c, int64_t hw, int32_t batch_stats,
                          const LifSpec* spec) {
    const int64_t grain = channel_grain(steps * batch * hw);
    if (dtype == 0) {
        BnLifBackward<float> f{(const float*)g_s, (const float*)x, (const float*)scale, (const float*)shift,
                               (const float*)mean, (const float*)invstd, (float*)g_x, sum_gy, sum_gy_xhat, g_rate,
                               steps, batch, c, hw, batch_stats, *spec};
        at::parallel_for(0, c, grain, f);
    } else if (dtype == 1) {
        BnLifBackward<double> f{(const double*)g_s, (const double*)x, (const double*)scale, (const double*)shift,
                                (const double*)mean, (const double*)invstd, (double*)g_x, sum_gy, sum_gy_xhat,
                                g_rate, steps, batch, c, hw, batch_stats, *spec};
        at::parallel_for(0, c, grain, f);
    } else {
        return 1;
    }
    return 0;
}

}  // extern "C"
