/* GPU benchmarks of the CUDA forward (fl_cuda_model) at LLaMA-3.1-8B shapes with random bf16
 * weights made on the device, against rooflines measured in the same run:
 * - HBM bandwidth: device-to-device cudaMemcpy (each byte read once and written once);
 * - bf16 peak: a large cuBLAS bf16 GEMM (fp32 accumulation);
 * - decode tokens/s at batch 1, 16, 64, 256 as a ratio to the HBM roofline (batch * bandwidth
 *   / bytes of the weights one step reads), and to one that adds the KV bytes read;
 * - prefill TFLOP/s as a ratio to the bf16 peak;
 * - decode at batch 64 with 8 adapters in the batch (rank 16; q,v and all linears) against
 *   none.
 * Writes cuda_<device name>.json into --out-dir. Without a usable device it says why and
 * exits 0. Run by tests/bench/run_cuda. */
#include "cuda/cuda_model.h"

#include <cjson/cJSON.h>
#include <cublas_v2.h>
#include <cuda_runtime_api.h>
#include <ctype.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define PROMPT 128     /* tokens per sequence before decoding */
#define WARMUP 2       /* decode steps before the timed ones */
#define STEPS 16       /* timed decode steps */
#define MAX_BATCH 256  /* sequences */
#define MAX_TOKENS 2048 /* most tokens in one forward (a prefill chunk) */
#define PAGES_PER_SEQ ((PROMPT + WARMUP + STEPS + FL_KV_PAGE_TOKENS - 1) / FL_KV_PAGE_TOKENS)

static void die(const char *what, const char *why) {
    fprintf(stderr, "bench_cuda: %s: %s\n", what, why);
    exit(1);
}

static void cuda_ok(cudaError_t e, const char *what) {
    if (e != cudaSuccess) die(what, cudaGetErrorString(e));
}

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static uint64_t rng = 0x2545F4914F6CDD1DULL;
static uint32_t next_u32(void) {
    rng ^= rng >> 12, rng ^= rng << 25, rng ^= rng >> 27;
    return (uint32_t)((rng * 0x2545F4914F6CDD1DULL) >> 32);
}
static float uniform(float lo, float hi) { return lo + (hi - lo) * (next_u32() >> 8) / 16777216.0f; }

static fl_config llama31_8b(void) {
    fl_config c = {0};
    c.arch = FL_ARCH_LLAMA;
    c.dim = 4096;
    c.hidden_dim = 14336;
    c.n_layers = 32;
    c.n_heads = 32;
    c.n_kv_heads = 8;
    c.head_dim = 128;
    c.vocab_size = 128256;
    c.max_seq_len = 131072;
    c.norm_eps = 1e-5f;
    c.rope_theta = 500000.0f;
    c.rope_scaling = FL_ROPE_SCALING_LLAMA3;
    c.rope_factor = 8.0f;
    c.rope_low_freq_factor = 1.0f;
    c.rope_high_freq_factor = 4.0f;
    c.rope_original_max_pos = 8192;
    c.bos_id = 128000;
    return c;
}

/* Parameters of the linear layers (not the embedding, whose rows a step barely reads). */
static double linear_params(const fl_config *c) {
    double q = (double)c->n_heads * c->head_dim, kv = (double)c->n_kv_heads * c->head_dim;
    double layer = c->dim * (q + 2 * kv) + q * c->dim + 3.0 * c->dim * c->hidden_dim;
    return c->n_layers * layer + (double)c->vocab_size * c->dim; /* + lm_head */
}

/* Best of 3 rounds of 5 device-to-device copies of 2 GiB, in GB/s (bytes read + written). */
static double measure_bandwidth(void) {
    size_t bytes = (size_t)2 << 30;
    void *a, *b;
    cuda_ok(cudaMalloc(&a, bytes), "bandwidth buffers");
    cuda_ok(cudaMalloc(&b, bytes), "bandwidth buffers");
    cuda_ok(cudaMemset(a, 1, bytes), "memset");
    cuda_ok(cudaMemcpy(b, a, bytes, cudaMemcpyDeviceToDevice), "copy");
    double best = 0.0;
    for (int round = 0; round < 3; round++) {
        cuda_ok(cudaDeviceSynchronize(), "sync");
        double t0 = now();
        for (int i = 0; i < 5; i++) cuda_ok(cudaMemcpy(b, a, bytes, cudaMemcpyDeviceToDevice), "copy");
        cuda_ok(cudaDeviceSynchronize(), "sync");
        double bw = 2.0 * bytes * 5 / (now() - t0) / 1e9;
        best = bw > best ? bw : best;
    }
    cudaFree(a);
    cudaFree(b);
    return best;
}

/* Best of 3 rounds of 10 bf16 GEMMs of 8192^3 on random operands (bf16 output, fp32
 * accumulation), in TFLOP/s. */
static double measure_bf16_peak(void) {
    const int n = 8192;
    size_t nn = (size_t)n * n;
    float *h = malloc(sizeof(float) * nn), *staging;
    uint16_t *m[3];
    for (size_t i = 0; i < nn; i++) h[i] = uniform(-1.0f, 1.0f);
    cuda_ok(cudaMalloc((void **)&staging, sizeof(float) * nn), "GEMM staging");
    cuda_ok(cudaMemcpy(staging, h, sizeof(float) * nn, cudaMemcpyHostToDevice), "GEMM upload");
    for (int i = 0; i < 3; i++) {
        cuda_ok(cudaMalloc((void **)&m[i], sizeof(uint16_t) * nn), "GEMM operands");
        if (fl_cuda_f32_to_bf16(m[i], staging, nn, NULL)) die("bf16 conversion", fl_last_error());
    }
    cublasHandle_t handle;
    if (cublasCreate(&handle) != CUBLAS_STATUS_SUCCESS) die("cuBLAS", "cannot create a handle");
    const float one = 1.0f, zero = 0.0f;
    double best = 0.0;
    for (int round = 0; round < 4; round++) { /* the first round warms up */
        cuda_ok(cudaDeviceSynchronize(), "sync");
        double t0 = now();
        for (int i = 0; i < 10; i++) {
            cublasStatus_t st = cublasGemmEx(handle, CUBLAS_OP_N, CUBLAS_OP_N, n, n, n, &one, m[0],
                                             CUDA_R_16BF, n, m[1], CUDA_R_16BF, n, &zero, m[2],
                                             CUDA_R_16BF, n, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
            if (st != CUBLAS_STATUS_SUCCESS) die("cuBLAS bf16 GEMM", cublasGetStatusString(st));
        }
        cuda_ok(cudaDeviceSynchronize(), "sync");
        double tf = 2.0 * n * (double)n * n * 10 / (now() - t0) / 1e12;
        if (round > 0 && tf > best) best = tf;
    }
    cublasDestroy(handle);
    for (int i = 0; i < 3; i++) cudaFree(m[i]);
    cudaFree(staging);
    free(h);
    return best;
}

typedef struct {
    const fl_config *c;
    fl_cuda_model *cm;
    int32_t tok[MAX_TOKENS], pos[MAX_TOKENS], start[MAX_TOKENS], slot[MAX_TOKENS],
        rows[MAX_TOKENS];
    int32_t pages[MAX_BATCH * PAGES_PER_SEQ]; /* the identity: sequence s owns a run of pages */
    float *logits;                            /* [MAX_BATCH, vocab] */
} bench;

static void forward(bench *b, int n, const int32_t *slot, int n_logits) {
    if (fl_cuda_model_forward(b->cm, b->tok, b->pos, b->start, slot, n, b->pages,
                              MAX_BATCH * PAGES_PER_SEQ, b->rows, n_logits, b->logits))
        die("forward", fl_last_error());
}

/* Prompts of PROMPT random tokens for sequences [0, n_seqs), seqs_per_chunk per forward,
 * each prompt's last row with logits. Returns seconds per forward after one untimed. */
static double prefill(bench *b, int n_seqs, int seqs_per_chunk) {
    double total = 0.0;
    int chunks = 0;
    for (int s0 = 0; s0 < n_seqs; s0 += seqs_per_chunk, chunks++) {
        int n = 0, k = 0;
        for (int s = s0; s < s0 + seqs_per_chunk && s < n_seqs; s++)
            for (int p = 0; p < PROMPT; p++, n++) {
                b->tok[n] = (int32_t)(next_u32() % b->c->vocab_size);
                b->pos[n] = p;
                b->start[n] = s * PAGES_PER_SEQ;
                if (p == PROMPT - 1) b->rows[k++] = n;
            }
        double t0 = now();
        forward(b, n, NULL, k);
        if (s0 > 0) total += now() - t0;
    }
    return chunks > 1 ? total / (chunks - 1) : 0.0;
}

/* Decode steps of `batch` sequences after their prompts, every row with logits; slot NULL
 * or a token's adapter slot. Seconds per timed step. */
static double decode(bench *b, int batch, const int32_t *slot) {
    double t0 = 0.0;
    for (int step = 0; step < WARMUP + STEPS; step++) {
        if (step == WARMUP) t0 = now();
        for (int s = 0; s < batch; s++) {
            b->tok[s] = (int32_t)(next_u32() % b->c->vocab_size);
            b->pos[s] = PROMPT + step;
            b->start[s] = s * PAGES_PER_SEQ;
            b->rows[s] = s;
        }
        forward(b, batch, slot, batch);
    }
    return (now() - t0) / STEPS;
}

/* Seconds to download one decode step's logits [batch, vocab] into pageable memory, as the
 * forward does: a part of every decode step, shown apart. */
static double logits_download(bench *b, int batch) {
    size_t bytes = sizeof(float) * batch * (size_t)b->c->vocab_size;
    void *d;
    cuda_ok(cudaMalloc(&d, bytes), "download buffer");
    cuda_ok(cudaMemcpy(b->logits, d, bytes, cudaMemcpyDeviceToHost), "download");
    double t0 = now();
    for (int i = 0; i < 5; i++) cuda_ok(cudaMemcpy(b->logits, d, bytes, cudaMemcpyDeviceToHost), "download");
    double t = (now() - t0) / 5;
    cudaFree(d);
    return t;
}

/* 8 random adapters of rank 16 on the targets into slots 0..7 (the matrices' values do not
 * change the time: every adapter gets its own device copy of the same random floats). */
static void set_adapters(bench *b, unsigned targets, const float *pool) {
    int n = b->c->n_layers * FL_LORA_N_TARGETS;
    const float **ab = malloc(sizeof(float *) * 2 * n);
    for (int i = 0; i < n; i++) {
        int on = targets & (1u << (i % FL_LORA_N_TARGETS));
        ab[i] = ab[n + i] = on ? pool : NULL;
    }
    fl_cuda_adapter a = {.rank = 16, .scale = 2.0f, .A = ab, .B = ab + n};
    for (int s = 0; s < 8; s++)
        if (fl_cuda_model_set_adapter(b->cm, s, &a)) die("adapter", fl_last_error());
    free(ab);
}

static void file_name(char *out, size_t cap, const char *dir, const char *device) {
    char name[256];
    size_t k = 0;
    for (const char *p = device; *p && k + 1 < sizeof name; p++)
        name[k++] = isalnum((unsigned char)*p) ? (char)tolower((unsigned char)*p) : '-';
    name[k] = 0;
    snprintf(out, cap, "%s/cuda_%s.json", dir, name);
}

int main(int argc, char **argv) {
    const char *out_dir = "tests/bench/results", *commit = "unknown";
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--out-dir")) out_dir = argv[i + 1];
        else if (!strcmp(argv[i], "--commit")) commit = argv[i + 1];
        else die("usage", "bench_cuda [--out-dir DIR] [--commit ID]");
    }
    char why[256];
    if (fl_cuda_device_probe(why, sizeof why) <= 0) {
        printf("bench: CUDA benchmarks skipped: no usable CUDA device (%s)\n", why);
        return 0;
    }
    struct cudaDeviceProp prop;
    cuda_ok(cudaGetDeviceProperties(&prop, 0), "device properties");
    printf("bench: CUDA benchmarks on %s\n", why);

    double bw = measure_bandwidth(), peak = measure_bf16_peak();
    printf("  HBM bandwidth (device-to-device copy): %.0f GB/s; bf16 GEMM peak: %.1f TFLOP/s\n",
           bw, peak);

    fl_config cfg = llama31_8b();
    double t0 = now();
    fl_cuda_weights *w = fl_cuda_weights_random(&cfg, FL_CUDA_BF16, 1);
    if (!w) die("random weights", fl_last_error());
    bench *b = calloc(1, sizeof *b);
    b->c = &cfg;
    if (!(b->cm = fl_cuda_model_new(w, MAX_TOKENS, MAX_BATCH * PAGES_PER_SEQ)))
        die("model", fl_last_error());
    for (int i = 0; i < MAX_BATCH * PAGES_PER_SEQ; i++) b->pages[i] = i;
    b->logits = malloc(sizeof(float) * (size_t)MAX_BATCH * cfg.vocab_size);
    printf("  LLaMA-3.1-8B shapes, random bf16 weights made on the device in %.1f s\n", now() - t0);

    double weight_bytes = 2.0 * linear_params(&cfg);
    double kv_dim = (double)cfg.n_kv_heads * cfg.head_dim;
    cJSON *root = cJSON_CreateObject();
    cJSON_AddStringToObject(root, "benchmark", "cuda");
    cJSON_AddStringToObject(root, "device", prop.name);
    cJSON_AddStringToObject(root, "device_detail", why);
    cJSON_AddStringToObject(root, "git_commit", commit);
    cJSON_AddStringToObject(root, "model", "LLaMA-3.1-8B shapes (dim 4096, hidden 14336, 32 layers, 32/8 heads, vocab 128256), random bf16 weights, fp32 KV pool");
    cJSON_AddNumberToObject(root, "hbm_bandwidth_GBps", bw);
    cJSON_AddNumberToObject(root, "bf16_peak_TFLOPs", peak);
    cJSON_AddNumberToObject(root, "weight_bytes_per_step", weight_bytes);
    cJSON *method = cJSON_AddObjectToObject(root, "method");
    cJSON_AddStringToObject(method, "bandwidth", "best of 3 rounds of 5 device-to-device cudaMemcpy of 2 GiB; GB/s = 2 * bytes / time");
    cJSON_AddStringToObject(method, "peak", "best of 3 rounds of 10 cublasGemmEx 8192^3, bf16 in and out, CUBLAS_COMPUTE_32F");
    cJSON_AddStringToObject(method, "decode", "batch sequences after 128-token prompts, 2 untimed then 16 timed steps, one forward per step with every row's logits downloaded; tok/s = batch / seconds per step");
    cJSON_AddStringToObject(method, "roofline", "batch * bandwidth / weight bytes per step (linear layers and lm_head in bf16); with_kv adds the fp32 K and V a step reads");
    cJSON_AddStringToObject(method, "prefill", "128-token prompts, 4 or 16 per forward, the last row of each with logits; FLOPs of the linear layers, of attention (causal) and of lm_head for those rows");

    /* decode */
    cJSON *dec = cJSON_AddArrayToObject(root, "decode");
    static const int batches[] = {1, 16, 64, 256};
    double ratio_b1 = 0.0;
    printf("  decode   batch  tok/s      ms/step  roofline tok/s  ratio  ratio(+KV)  logits download ms\n");
    for (int i = 0; i < 4; i++) {
        int B = batches[i];
        prefill(b, B, 16);
        double step = decode(b, B, NULL), dl = logits_download(b, B);
        double ctx = PROMPT + WARMUP + STEPS / 2.0; /* mean positions a timed step attends */
        double kv_bytes = B * cfg.n_layers * 2.0 * kv_dim * 4.0 * ctx;
        double roof = B * bw * 1e9 / weight_bytes, roof_kv = B * bw * 1e9 / (weight_bytes + kv_bytes);
        double tps = B / step;
        printf("           %5d  %9.1f  %7.2f  %14.1f  %5.2f  %10.2f  %18.2f\n", B, tps, step * 1e3,
               roof, tps / roof, tps / roof_kv, dl * 1e3);
        cJSON *o = cJSON_CreateObject();
        cJSON_AddNumberToObject(o, "batch", B);
        cJSON_AddNumberToObject(o, "tokens_per_s", tps);
        cJSON_AddNumberToObject(o, "ms_per_step", step * 1e3);
        cJSON_AddNumberToObject(o, "roofline_tokens_per_s", roof);
        cJSON_AddNumberToObject(o, "ratio_to_roofline", tps / roof);
        cJSON_AddNumberToObject(o, "kv_bytes_per_step", kv_bytes);
        cJSON_AddNumberToObject(o, "ratio_to_roofline_with_kv", tps / roof_kv);
        cJSON_AddNumberToObject(o, "logits_download_ms", dl * 1e3);
        cJSON_AddItemToArray(dec, o);
        if (B == 1) ratio_b1 = tps / roof;
    }

    /* prefill */
    cJSON *pre = cJSON_AddArrayToObject(root, "prefill");
    double best_ratio = 0.0;
    static const int per_chunk[] = {4, 16};
    for (int i = 0; i < 2; i++) {
        int S = per_chunk[i], T = S * PROMPT;
        double t = prefill(b, 4 * S, S); /* 3 timed forwards after one untimed */
        double attn = 4.0 * cfg.n_layers * cfg.n_heads * cfg.head_dim * S * PROMPT * (PROMPT + 1) / 2.0;
        double flops = 2.0 * (linear_params(&cfg) - (double)cfg.vocab_size * cfg.dim) * T +
                       2.0 * cfg.vocab_size * cfg.dim * S + attn;
        double tf = flops / t / 1e12;
        printf("  prefill  %d tokens per forward: %.2f ms, %.1f TFLOP/s, %.2f of the bf16 peak\n", T,
               t * 1e3, tf, tf / peak);
        cJSON *o = cJSON_CreateObject();
        cJSON_AddNumberToObject(o, "tokens_per_forward", T);
        cJSON_AddNumberToObject(o, "ms_per_forward", t * 1e3);
        cJSON_AddNumberToObject(o, "tokens_per_s", T / t);
        cJSON_AddNumberToObject(o, "TFLOPs", tf);
        cJSON_AddNumberToObject(o, "ratio_to_bf16_peak", tf / peak);
        cJSON_AddItemToArray(pre, o);
        best_ratio = tf / peak > best_ratio ? tf / peak : best_ratio;
    }

    /* multi-LoRA: batch 64, token t in slot t % 8 */
    float *pool = malloc(sizeof(float) * 16 * (size_t)cfg.hidden_dim);
    for (int i = 0; i < 16 * cfg.hidden_dim; i++) pool[i] = uniform(-0.01f, 0.01f);
    int32_t slots[64];
    for (int t = 0; t < 64; t++) slots[t] = t % 8;
    cJSON *lora = cJSON_AddArrayToObject(root, "multi_lora");
    double worst_overhead = 0.0;
    struct {
        const char *name;
        unsigned targets;
    } sets[] = {{"q,v", (1u << FL_LORA_Q) | (1u << FL_LORA_V)}, {"all linears", FL_LORA_ALL_LINEARS}};
    for (int i = 0; i < 2; i++) {
        set_adapters(b, sets[i].targets, pool);
        prefill(b, 64, 16);
        double none = decode(b, 64, NULL);
        prefill(b, 64, 16);
        double with = decode(b, 64, slots);
        double over = with / none - 1.0;
        printf("  multi-LoRA, batch 64, 8 adapters of rank 16 on %s: %.2f ms/step vs %.2f without "
               "(+%.1f%%)\n",
               sets[i].name, with * 1e3, none * 1e3, 100 * over);
        cJSON *o = cJSON_CreateObject();
        cJSON_AddStringToObject(o, "targets", sets[i].name);
        cJSON_AddNumberToObject(o, "batch", 64);
        cJSON_AddNumberToObject(o, "adapters", 8);
        cJSON_AddNumberToObject(o, "rank", 16);
        cJSON_AddNumberToObject(o, "ms_per_step_without", none * 1e3);
        cJSON_AddNumberToObject(o, "ms_per_step_with", with * 1e3);
        cJSON_AddNumberToObject(o, "overhead", over);
        cJSON_AddItemToArray(lora, o);
        worst_overhead = over > worst_overhead ? over : worst_overhead;
    }

    cJSON *goals = cJSON_AddObjectToObject(root, "goals");
    cJSON_AddNumberToObject(goals, "decode_batch1_ratio_min", 0.8);
    cJSON_AddBoolToObject(goals, "decode_batch1_met", ratio_b1 >= 0.8);
    cJSON_AddNumberToObject(goals, "prefill_ratio_min", 0.6);
    cJSON_AddBoolToObject(goals, "prefill_met", best_ratio >= 0.6);
    cJSON_AddNumberToObject(goals, "multi_lora_overhead_max", 0.15);
    cJSON_AddBoolToObject(goals, "multi_lora_met", worst_overhead < 0.15);
    printf("  goals: decode batch 1 at %.2f of the roofline (>= 0.8: %s); prefill at %.2f of the "
           "peak (>= 0.6: %s); 8 adapters +%.1f%% (< 15%%: %s)\n",
           ratio_b1, ratio_b1 >= 0.8 ? "met" : "not met", best_ratio,
           best_ratio >= 0.6 ? "met" : "not met", 100 * worst_overhead,
           worst_overhead < 0.15 ? "met" : "not met");

    char path[4096];
    file_name(path, sizeof path, out_dir, prop.name);
    char *text = cJSON_Print(root);
    FILE *f = fopen(path, "w");
    if (!f || fputs(text, f) < 0 || fputc('\n', f) < 0 || fclose(f) != 0) die(path, "cannot write");
    printf("bench: CUDA results in %s\n", path);
    free(text);
    cJSON_Delete(root);
    free(pool);
    free(b->logits);
    fl_cuda_model_free(b->cm);
    fl_cuda_weights_free(w);
    free(b);
    return 0;
}
