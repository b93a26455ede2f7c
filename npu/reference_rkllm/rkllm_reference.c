/*
 * A reference librkllmrt for machines without an NPU: the functions and callback
 * protocol of Rockchip's rkllm.h, version 1.3.0, implemented over llama.cpp's C API on a
 * GGUF twin of the .rkllm model. npuserve's RKLLM backend (npu/rkllm_backend.py) runs
 * against it in CI exactly as it would against librkllmrt on a board: the same ctypes
 * structs, callbacks, pauses, aborts and return codes. It shows nothing of the NPU's
 * speed, quantisation or driver failures; those are injected:
 *
 *   RKLLM_REFERENCE_FAULT=init_fail       rkllm_init returns -1
 *   RKLLM_REFERENCE_FAULT=error_after:N   from run N+1 on, the callback gets
 *                                         RKLLM_RUN_ERROR and rkllm_run returns -1
 *   RKLLM_REFERENCE_FAULT=hang_after:N    from run N+1 on, rkllm_run never returns
 *   RKLLM_REFERENCE_FAULT_FILE=PATH       the same, read from PATH at every call
 *
 * Where rkllm.h leaves behaviour open, one reading is implemented here and named:
 *   - keep_history = 0 clears the KV cache before the run (the run sees no history).
 *   - A run paused by the callback (return 1) has not evaluated the token it just
 *     reported: the KV cache holds the prompt and every token reported before it.
 *     RKLLM_REFERENCE_PAUSE_WRITES_KV=1 implements the other reading (the paused token
 *     is already in the cache), so the backend's handling of both runs in CI.
 *   - rkllm_clear_kv_cache with a range [start, end) clears that tail of the cache after
 *     any run. rkllm.h says ranges are "only valid when keep_history == 0 and the
 *     generation has been paused": RKLLM_REFERENCE_STRICT_RANGES=1 refuses (-1) a range
 *     at any other time, so the backend's fallback for that reading runs in CI too.
 *   - After rkllm_abort the run stops with no further callback and returns -1.
 *   - RKLLM_INFER_GET_LAST_HIDDEN_LAYER gives the final hidden state after the model's
 *     output norm (what the LM head multiplies), one row per input token.
 *
 * The types below are declared from Rockchip's documented header, field for field; the
 * layout check (rkllm_reference_layout) lets the tests compare them with the ctypes
 * mirror in npu/rkllm_api.py.
 */
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "llama.h"

/* --- rkllm.h 1.3.0 -------------------------------------------------------------- */
typedef void *LLMHandle;
typedef enum { RKLLM_RUN_NORMAL = 0, RKLLM_RUN_WAITING = 1, RKLLM_RUN_FINISH = 2,
               RKLLM_RUN_ERROR = 3 } LLMCallState;
typedef enum { RKLLM_INPUT_PROMPT = 0, RKLLM_INPUT_TOKEN = 1, RKLLM_INPUT_EMBED = 2,
               RKLLM_INPUT_MULTIMODAL = 3 } RKLLMInputType;
typedef enum { RKLLM_INFER_GENERATE = 0, RKLLM_INFER_GET_LAST_HIDDEN_LAYER = 1,
               RKLLM_INFER_GET_LOGITS = 2 } RKLLMInferMode;

typedef int (*LLMGetEmbedCallback)(void *, int32_t *, uint64_t, void *, uint64_t);
typedef int (*LLMTokenizerCallback)(void *, const char *, int32_t, int32_t *, int32_t);

typedef struct {
    int32_t base_domain_id;
    int8_t embed_flash;
    int8_t enabled_cpus_num;
    uint32_t enabled_cpus_mask;
    uint8_t n_batch;
    int8_t use_cross_attn;
    uint8_t reserved[104];
} RKLLMExtendParam;

typedef struct {
    const char *model_path;
    int32_t max_context_len;
    int32_t max_new_tokens;
    int32_t top_k;
    int32_t n_keep;
    float top_p;
    float temperature;
    float repeat_penalty;
    float frequency_penalty;
    float presence_penalty;
    int32_t mirostat;
    float mirostat_tau;
    float mirostat_eta;
    bool skip_special_token;
    bool ignore_eos_token;
    bool is_async;
    RKLLMExtendParam extend_param;
} RKLLMParam;

typedef struct { const char *lora_adapter_path; const char *lora_adapter_name; float scale; }
    RKLLMLoraAdapter;
typedef struct { float *embed; size_t n_tokens; } RKLLMEmbedInput;
typedef struct { int32_t *input_ids; size_t n_tokens; } RKLLMTokenInput;
typedef struct {
    char *prompt;
    struct {
        float *image_embed; size_t n_image_tokens; size_t n_image;
        const char *image_start; const char *image_end; const char *image_content;
        size_t image_width; size_t image_height;
    } image;
    struct {
        float *video_embed; size_t n_frame_tokens; size_t n_frame_per_video; size_t n_video;
        const char *video_start; const char *video_end; const char *video_content;
        size_t frame_width; size_t frame_height;
    } video;
} RKLLMMultiModalInput;

typedef struct {
    const char *role;
    bool enable_thinking;
    RKLLMInputType input_type;
    union {
        const char *prompt_input;
        RKLLMEmbedInput embed_input;
        RKLLMTokenInput token_input;
        RKLLMMultiModalInput multimodal_input;
    };
} RKLLMInput;

typedef struct { const char *lora_adapter_name; } RKLLMLoraParam;
typedef struct { int save_prompt_cache; const char *prompt_cache_path; } RKLLMPromptCacheParam;
typedef struct {
    float *encoder_k_cache; float *encoder_v_cache; float *encoder_mask;
    int32_t *encoder_pos; int num_tokens;
} RKLLMCrossAttnParam;
typedef struct {
    int32_t top_k; float top_p; float temperature; float repeat_penalty;
    float frequency_penalty; float presence_penalty; int32_t mirostat; float mirostat_tau;
    float mirostat_eta;
} RKLLMSamplingParam;

typedef struct {
    RKLLMInferMode mode;
    RKLLMLoraParam *lora_params;
    RKLLMPromptCacheParam *prompt_cache_params;
    RKLLMSamplingParam *sampling_params;
    int keep_history;
    int32_t max_new_tokens;
} RKLLMInferParam;

typedef struct { const float *hidden_states; int embd_size; int num_tokens; }
    RKLLMResultLastHiddenLayer;
typedef struct { const float *logits; int vocab_size; int num_tokens; } RKLLMResultLogits;
typedef struct {
    float prefill_time_ms; int prefill_tokens; float generate_time_ms; int generate_tokens;
    float memory_usage_mb;
} RKLLMPerfStat;
typedef struct {
    const char *text;
    int32_t token_id;
    RKLLMResultLastHiddenLayer last_hidden_layer;
    RKLLMResultLogits logits;
    RKLLMPerfStat perf;
} RKLLMResult;

typedef int (*LLMResultCallback)(RKLLMResult *result, void *userdata, LLMCallState state);
typedef struct {
    LLMResultCallback result_callback;
    void *result_userdata;
    LLMTokenizerCallback tokenizer_callback;
    void *tokenizer_userdata;
    LLMGetEmbedCallback embed_callback;
    void *embed_userdata;
} RKLLMCallback;

/* --- the reference runtime ------------------------------------------------------ */
#define VERSION_BANNER "rkllm-runtime version: 1.3.0 (npuserve reference over llama.cpp)"

typedef struct {
    struct llama_model *model;
    struct llama_context *ctx;
    const struct llama_vocab *vocab;
    struct llama_batch batch;
    int n_batch, n_ctx, n_embd, n_vocab;
    RKLLMParam param;
    RKLLMCallback cb;
    int n_past;                /* positions the KV cache holds, from 0 */
    volatile int abort_flag;
    volatile int running;
    int paused;                /* the last run was paused by its callback */
    int last_keep_history;
    float *rows;               /* hidden states or logits of the current run */
    size_t rows_cap;
} Shim;

static long g_runs = 0;

static void quiet_log(enum ggml_log_level level, const char *text, void *user) {
    (void)user;
    if (level == GGML_LOG_LEVEL_ERROR) fputs(text, stderr);
}

/* The injected fault, and its count (0 when none). */
static int fault(const char *kind, long *after) {
    char spec[128] = {0};
    const char *env = getenv("RKLLM_REFERENCE_FAULT");
    const char *path = getenv("RKLLM_REFERENCE_FAULT_FILE");
    if (path) {
        FILE *f = fopen(path, "r");
        if (f) {
            size_t n = fread(spec, 1, sizeof spec - 1, f);
            spec[n] = 0;
            fclose(f);
        }
    } else if (env) {
        strncpy(spec, env, sizeof spec - 1);
    }
    size_t k = strlen(kind);
    if (strncmp(spec, kind, k) != 0) return 0;
    *after = spec[k] == ':' ? strtol(spec + k + 1, NULL, 10) : 0;
    return 1;
}

static double now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

RKLLMParam rkllm_createDefaultParam(void) {
    RKLLMParam p;
    memset(&p, 0, sizeof p);
    p.max_context_len = 512;
    p.max_new_tokens = -1;
    p.top_k = 1;
    p.top_p = 0.9f;
    p.temperature = 0.8f;
    p.repeat_penalty = 1.1f;
    p.mirostat_tau = 5.0f;
    p.mirostat_eta = 0.1f;
    p.skip_special_token = true;
    p.extend_param.base_domain_id = 0;
    p.extend_param.n_batch = 1;
    return p;
}

int rkllm_reference_layout(size_t *out, int n) {
    const size_t v[] = {
        sizeof(RKLLMParam), offsetof(RKLLMParam, extend_param), sizeof(RKLLMExtendParam),
        sizeof(RKLLMInput), offsetof(RKLLMInput, input_type), offsetof(RKLLMInput, token_input),
        sizeof(RKLLMInferParam), offsetof(RKLLMInferParam, keep_history),
        sizeof(RKLLMResult), offsetof(RKLLMResult, perf), sizeof(RKLLMCallback),
        sizeof(RKLLMSamplingParam),
    };
    int count = (int)(sizeof v / sizeof v[0]);
    for (int i = 0; i < n && i < count; i++) out[i] = v[i];
    return count;
}

int rkllm_init(LLMHandle *handle, RKLLMParam *param, RKLLMCallback *callback) {
    long unused;
    if (!handle || !param || !param->model_path || !callback || !callback->result_callback) {
        fprintf(stderr, "E rkllm: invalid parameters\n");
        return -1;
    }
    *handle = NULL;
    printf("I rkllm: %s\n", VERSION_BANNER);
    fflush(stdout);
    if (fault("init_fail", &unused)) {
        fprintf(stderr, "E rkllm: failed to init the npu (injected)\n");
        return -1;
    }
    llama_log_set(quiet_log, NULL);
    llama_backend_init();
    struct llama_model_params mp = llama_model_default_params();
    struct llama_model *model = llama_model_load_from_file(param->model_path, mp);
    if (!model) {
        fprintf(stderr, "E rkllm: failed to load model %s\n", param->model_path);
        return -1;
    }
    int n_ctx = param->max_context_len > 0 ? param->max_context_len : 512;
    struct llama_context_params cp = llama_context_default_params();
    cp.n_ctx = (uint32_t)n_ctx;
    cp.n_batch = cp.n_ubatch = (uint32_t)(n_ctx < 512 ? n_ctx : 512);
    cp.n_seq_max = 1;
    cp.embeddings = false;
    cp.pooling_type = LLAMA_POOLING_TYPE_NONE;
    cp.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_DISABLED;
    int threads = param->extend_param.enabled_cpus_num > 0
                      ? param->extend_param.enabled_cpus_num : 1;
    cp.n_threads = cp.n_threads_batch = threads;
    struct llama_context *ctx = llama_init_from_model(model, cp);
    if (!ctx) {
        llama_model_free(model);
        fprintf(stderr, "E rkllm: failed to create a context of %d tokens\n", n_ctx);
        return -1;
    }
    Shim *s = calloc(1, sizeof *s);
    s->model = model;
    s->ctx = ctx;
    s->vocab = llama_model_get_vocab(model);
    s->n_ctx = n_ctx;
    s->n_batch = (int)cp.n_batch;
    s->n_embd = llama_model_n_embd(model);
    s->n_vocab = llama_vocab_n_tokens(s->vocab);
    s->batch = llama_batch_init(s->n_batch, 0, 1);
    s->param = *param;
    s->cb = *callback;
    *handle = s;
    return 0;
}

int rkllm_destroy(LLMHandle handle) {
    Shim *s = handle;
    if (!s) return -1;
    llama_batch_free(s->batch);
    llama_free(s->ctx);
    llama_model_free(s->model);
    free(s->rows);
    free(s);
    return 0;
}

static float *rows(Shim *s, size_t n) {
    if (n > s->rows_cap) {
        free(s->rows);
        s->rows = malloc(n * sizeof(float));
        s->rows_cap = s->rows ? n : 0;
    }
    return s->rows;
}

/* Evaluate tokens at the end of the cache; with `width` > 0 copy each token's output row
 * (its hidden state when `hidden`, else its logits: `width` floats) into s->rows.
 * Returns 0, or -1. */
static int eval(Shim *s, const int32_t *toks, int n, int width, int hidden) {
    for (int i = 0; i < n; i += s->n_batch) {
        if (s->abort_flag) return -1;
        int m = n - i < s->n_batch ? n - i : s->n_batch;
        for (int j = 0; j < m; j++) {
            s->batch.token[j] = toks[i + j];
            s->batch.pos[j] = s->n_past + j;
            s->batch.n_seq_id[j] = 1;
            s->batch.seq_id[j][0] = 0;
            s->batch.logits[j] = width > 0 || i + j == n - 1;
        }
        s->batch.n_tokens = m;
        if (llama_decode(s->ctx, s->batch) != 0) return -1;
        if (width > 0) {
            for (int j = 0; j < m; j++) {
                const float *src = hidden ? llama_get_embeddings_ith(s->ctx, j)
                                          : llama_get_logits_ith(s->ctx, j);
                if (!src) return -1;
                memcpy(s->rows + (size_t)(i + j) * width, src, width * sizeof(float));
            }
        }
        s->n_past += m;
    }
    return 0;
}

static int fail(Shim *s, void *ud, const char *why) {
    RKLLMResult r;
    memset(&r, 0, sizeof r);
    fprintf(stderr, "E rkllm: %s\n", why);
    s->running = 0;
    s->cb.result_callback(&r, ud, RKLLM_RUN_ERROR);
    return -1;
}

static struct llama_sampler *sampler(Shim *s, const RKLLMSamplingParam *sp) {
    RKLLMSamplingParam d = {s->param.top_k, s->param.top_p, s->param.temperature,
                            s->param.repeat_penalty, s->param.frequency_penalty,
                            s->param.presence_penalty, 0, 0, 0};
    if (!sp) sp = &d;
    struct llama_sampler *c = llama_sampler_chain_init(llama_sampler_chain_default_params());
    llama_sampler_chain_add(c, llama_sampler_init_penalties(s->n_vocab, 64, sp->repeat_penalty,
                                                            sp->frequency_penalty,
                                                            sp->presence_penalty));
    if (sp->top_k == 1 || sp->temperature <= 0) {
        llama_sampler_chain_add(c, llama_sampler_init_greedy());
    } else {
        llama_sampler_chain_add(c, llama_sampler_init_top_k(sp->top_k));
        llama_sampler_chain_add(c, llama_sampler_init_top_p(sp->top_p, 1));
        llama_sampler_chain_add(c, llama_sampler_init_temp(sp->temperature));
        llama_sampler_chain_add(c, llama_sampler_init_dist(LLAMA_DEFAULT_SEED));
    }
    return c;
}

static int generate(Shim *s, RKLLMInferParam *ip, void *ud, double t0, int n_in) {
    int max_new = ip->max_new_tokens > 0 ? ip->max_new_tokens : s->param.max_new_tokens;
    if (max_new <= 0) max_new = s->n_ctx;
    int writes = getenv("RKLLM_REFERENCE_PAUSE_WRITES_KV") &&
                 strcmp(getenv("RKLLM_REFERENCE_PAUSE_WRITES_KV"), "1") == 0;
    struct llama_sampler *smpl = sampler(s, ip->sampling_params);
    double t1 = now_ms();
    RKLLMResult r;
    char piece[256];
    int status = 0;
    for (int made = 0;; made++) {
        memset(&r, 0, sizeof r);
        if (made >= max_new || s->n_past >= s->n_ctx) {
            r.perf.prefill_time_ms = (float)(t1 - t0);
            r.perf.prefill_tokens = n_in;
            r.perf.generate_time_ms = (float)(now_ms() - t1);
            r.perf.generate_tokens = made;
            s->running = 0;
            s->cb.result_callback(&r, ud, RKLLM_RUN_FINISH);
            break;
        }
        int32_t tok = llama_sampler_sample(smpl, s->ctx, -1);
        llama_sampler_accept(smpl, tok);
        if (llama_vocab_is_eog(s->vocab, tok) && !s->param.ignore_eos_token) {
            s->running = 0;
            s->cb.result_callback(&r, ud, RKLLM_RUN_FINISH);
            break;
        }
        int n = llama_token_to_piece(s->vocab, tok, piece, sizeof piece - 1, 0,
                                     !s->param.skip_special_token);
        piece[n > 0 ? n : 0] = 0;
        r.text = piece;
        r.token_id = tok;
        if (writes && eval(s, &tok, 1, 0, 0) != 0) { status = fail(s, ud, "decode failed"); break; }
        int answer = s->cb.result_callback(&r, ud, RKLLM_RUN_NORMAL);
        if (s->abort_flag) { status = -1; break; }
        if (answer == 1) { s->paused = 1; break; }  /* the caller runs again */
        if (!writes && eval(s, &tok, 1, 0, 0) != 0) { status = fail(s, ud, "decode failed"); break; }
    }
    llama_sampler_free(smpl);
    return status;
}

int rkllm_run(LLMHandle handle, RKLLMInput *input, RKLLMInferParam *ip, void *userdata) {
    Shim *s = handle;
    if (!s || !input || !ip) return -1;
    void *ud = userdata ? userdata : s->cb.result_userdata;
    long after;
    long run = ++g_runs;
    if (fault("hang_after", &after) && run > after) {
        fprintf(stderr, "E rkllm: failed to submit (injected); hanging\n");
        for (;;) sleep(60);  /* a hung NPU answers nothing, abort included */
    }
    s->running = 1;
    s->abort_flag = 0;
    s->paused = 0;
    s->last_keep_history = ip->keep_history;
    if (fault("error_after", &after) && run > after) return fail(s, ud, "run failed (injected)");
    int32_t *toks = NULL;
    int n = 0, owned = 0;
    if (input->input_type == RKLLM_INPUT_TOKEN) {
        toks = input->token_input.input_ids;
        n = (int)input->token_input.n_tokens;
    } else if (input->input_type == RKLLM_INPUT_PROMPT && input->prompt_input) {
        int len = (int)strlen(input->prompt_input);
        toks = malloc((len + 8) * sizeof *toks);
        owned = 1;
        n = llama_tokenize(s->vocab, input->prompt_input, len, toks, len + 8, false, true);
    } else {
        s->running = 0;
        fprintf(stderr, "E rkllm: input type %d is not in the reference runtime\n",
                input->input_type);
        return -1;
    }
    if (!ip->keep_history) {
        llama_memory_clear(llama_get_memory(s->ctx), true);
        s->n_past = 0;
    }
    int status;
    if (n <= 0 || !toks) {
        status = fail(s, ud, "empty input");
    } else if (s->n_past + n > s->n_ctx) {
        status = fail(s, ud, "input exceeds max_context_len");
    } else {
        for (int i = 0; i < n; i++)
            if (toks[i] < 0 || toks[i] >= s->n_vocab) { n = -1; break; }
        double t0 = now_ms();
        if (n < 0) {
            status = fail(s, ud, "token id out of the vocabulary");
        } else if (ip->mode == RKLLM_INFER_GENERATE) {
            status = eval(s, toks, n, 0, 0) == 0 ? generate(s, ip, ud, t0, n)
                                                 : (s->abort_flag ? -1 : fail(s, ud, "decode failed"));
        } else if (ip->mode == RKLLM_INFER_GET_LAST_HIDDEN_LAYER ||
                   ip->mode == RKLLM_INFER_GET_LOGITS) {
            int hidden = ip->mode == RKLLM_INFER_GET_LAST_HIDDEN_LAYER;
            int width = hidden ? s->n_embd : s->n_vocab;
            llama_set_embeddings(s->ctx, hidden);
            if (!rows(s, (size_t)n * width)) {
                status = fail(s, ud, "out of memory");
            } else if (eval(s, toks, n, width, hidden) != 0) {
                status = s->abort_flag ? -1 : fail(s, ud, "decode failed");
            } else {
                RKLLMResult r;
                memset(&r, 0, sizeof r);
                if (hidden) {
                    r.last_hidden_layer.hidden_states = s->rows;
                    r.last_hidden_layer.embd_size = width;
                    r.last_hidden_layer.num_tokens = n;
                } else {
                    r.logits.logits = s->rows;
                    r.logits.vocab_size = width;
                    r.logits.num_tokens = n;
                }
                r.perf.prefill_time_ms = (float)(now_ms() - t0);
                r.perf.prefill_tokens = n;
                s->cb.result_callback(&r, ud, RKLLM_RUN_NORMAL);
                memset(&r, 0, sizeof r);
                s->running = 0;
                s->cb.result_callback(&r, ud, RKLLM_RUN_FINISH);
                status = 0;
            }
            llama_set_embeddings(s->ctx, false);
        } else {
            status = fail(s, ud, "unknown infer mode");
        }
    }
    if (owned) free(toks);
    s->running = 0;
    return status;
}

int rkllm_abort(LLMHandle handle) {
    Shim *s = handle;
    if (!s) return -1;
    s->abort_flag = 1;
    return 0;
}

int rkllm_is_running(LLMHandle handle) {
    Shim *s = handle;
    return s && s->running ? 1 : 0;
}

int rkllm_clear_kv_cache(LLMHandle handle, int keep_system_prompt, int *start_pos,
                         int *end_pos) {
    Shim *s = handle;
    (void)keep_system_prompt;  /* the reference runtime keeps no system prompt */
    if (!s || s->running) return -1;
    llama_memory_t mem = llama_get_memory(s->ctx);
    if (start_pos && end_pos && start_pos[0] < end_pos[0]) {
        const char *strict = getenv("RKLLM_REFERENCE_STRICT_RANGES");
        if (strict && strcmp(strict, "1") == 0 && !(s->paused && !s->last_keep_history)) {
            fprintf(stderr, "E rkllm: a cache range is only valid after a paused run with"
                            " keep_history = 0\n");
            return -1;
        }
        if (start_pos[0] < 0 || end_pos[0] < s->n_past) return -1;  /* only the tail */
        llama_memory_seq_rm(mem, 0, start_pos[0], -1);
        if (start_pos[0] < s->n_past) s->n_past = start_pos[0];
        return 0;
    }
    llama_memory_clear(mem, true);
    s->n_past = 0;
    return 0;
}

int rkllm_get_kv_cache_size(LLMHandle handle, int *cache_sizes) {
    Shim *s = handle;
    if (!s || !cache_sizes) return -1;
    cache_sizes[0] = s->n_past;
    return 0;
}

int rkllm_set_chat_template(LLMHandle handle, const char *system_prompt,
                            const char *prompt_prefix, const char *prompt_postfix) {
    (void)system_prompt; (void)prompt_prefix; (void)prompt_postfix;
    return handle ? 0 : -1;  /* only RKLLM_INPUT_PROMPT uses it; npuserve sends tokens */
}

static int unsupported(const char *what) {
    fprintf(stderr, "E rkllm: %s is not in the reference runtime\n", what);
    return -1;
}

int rkllm_load_lora(LLMHandle h, RKLLMLoraAdapter *a) { (void)h; (void)a; return unsupported("rkllm_load_lora"); }
int rkllm_load_prompt_cache(LLMHandle h, const char *p) { (void)h; (void)p; return unsupported("rkllm_load_prompt_cache"); }
int rkllm_release_prompt_cache(LLMHandle h) { (void)h; return unsupported("rkllm_release_prompt_cache"); }
int rkllm_run_async(LLMHandle h, RKLLMInput *i, RKLLMInferParam *p, void *u) { (void)h; (void)i; (void)p; (void)u; return unsupported("rkllm_run_async"); }
int rkllm_set_function_tools(LLMHandle h, const char *a, const char *b, const char *c) { (void)h; (void)a; (void)b; (void)c; return unsupported("rkllm_set_function_tools"); }
int rkllm_set_cross_attn_params(LLMHandle h, RKLLMCrossAttnParam *p) { (void)h; (void)p; return unsupported("rkllm_set_cross_attn_params"); }
