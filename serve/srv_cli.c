/*
 * serve/srv_cli.c — small helpers the subcommands share: strict flag value
 * parsing with messages that name the flag, JSON string output, and the
 * lookup of the bundled model.
 */
#include "srv.h"

#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

int
srv_parse_u64(const char *cmd, const char *flag, const char *s, uint64_t *out)
{
    char *end;
    errno = 0;
    if (s == NULL || *s == '\0' || *s == '-')
        goto bad;
    unsigned long long v = strtoull(s, &end, 10);
    if (errno || *end != '\0')
        goto bad;
    *out = v;
    return 0;
bad:
    fprintf(stderr, "kvserve %s: %s: expected a non-negative integer, got '%s'\n", cmd, flag,
            s ? s : "");
    return KVS_EINVAL;
}

int
srv_parse_bytes(const char *cmd, const char *flag, const char *s, uint64_t *out)
{
    static const struct {
        const char *name;
        uint64_t scale;
    } units[] = {
        {"", 1},
        {"B", 1},
        {"K", 1000},
        {"k", 1000},
        {"KB", 1000},
        {"kB", 1000},
        {"M", 1000000},
        {"MB", 1000000},
        {"G", 1000000000},
        {"GB", 1000000000},
        {"T", 1000000000000},
        {"TB", 1000000000000},
        {"Ki", 1ull << 10},
        {"KiB", 1ull << 10},
        {"Mi", 1ull << 20},
        {"MiB", 1ull << 20},
        {"Gi", 1ull << 30},
        {"GiB", 1ull << 30},
        {"Ti", 1ull << 40},
        {"TiB", 1ull << 40},
    };
    const char *p = s ? s : "";
    size_t digits = strspn(p, "0123456789"), n = digits;
    if (p[n] == '.')
        n += 1 + strspn(p + n + 1, "0123456789");
    char num[32];
    if (digits == 0 || n == digits + 1 || n >= sizeof num) /* "", "1.", too long */
        goto bad;
    memcpy(num, p, n);
    num[n] = '\0';
    for (size_t i = 0; i < sizeof units / sizeof units[0]; i++) {
        if (strcmp(p + n, units[i].name) != 0)
            continue;
        uint64_t sc = units[i].scale;
        /* Whole numbers exactly; a fraction through a double, which is
         * exact to far below a byte at any size that fits. */
        errno = 0;
        unsigned long long v = n == digits ? strtoull(num, NULL, 10) : 0;
        double f = n == digits ? (double)v * (double)sc : strtod(num, NULL) * (double)sc;
        if (errno || f >= 9223372036854775808.0) {
            fprintf(stderr, "kvserve %s: %s: '%s' is more than 2^63 bytes\n", cmd, flag, p);
            return KVS_EINVAL;
        }
        *out = n == digits ? (uint64_t)v * sc : (uint64_t)f;
        return 0;
    }
bad:
    fprintf(stderr,
            "kvserve %s: %s: expected a size in bytes, or with a unit (K, M, G, T; Ki, Mi, Gi, "
            "Ti; a B after any), got '%s'\n",
            cmd, flag, p);
    return KVS_EINVAL;
}

int
srv_parse_u32(const char *cmd, const char *flag, const char *s, uint32_t lo, uint32_t hi,
              uint32_t *out)
{
    uint64_t v;
    if (srv_parse_u64(cmd, flag, s, &v))
        return KVS_EINVAL;
    if (v < lo || v > hi) {
        fprintf(stderr, "kvserve %s: %s: %llu is outside [%u, %u]\n", cmd, flag,
                (unsigned long long)v, lo, hi);
        return KVS_EINVAL;
    }
    *out = (uint32_t)v;
    return 0;
}

int
srv_parse_f32(const char *cmd, const char *flag, const char *s, float lo, float hi, float *out)
{
    char *end;
    errno = 0;
    float v = s && *s ? strtof(s, &end) : NAN;
    if (s == NULL || *s == '\0' || errno || *end != '\0' || !isfinite(v)) {
        fprintf(stderr, "kvserve %s: %s: expected a number, got '%s'\n", cmd, flag, s ? s : "");
        return KVS_EINVAL;
    }
    if (v < lo || v > hi) {
        fprintf(stderr, "kvserve %s: %s: %g is outside [%g, %g]\n", cmd, flag, v, lo, hi);
        return KVS_EINVAL;
    }
    *out = v;
    return 0;
}

const char *
srv_kv_policy_name(sched_kv_kind_t k)
{
    static const char *const names[] = {[SCHED_KV_FULL] = "full",
                                        [SCHED_KV_SINK_EVICTION] = "sink-eviction",
                                        [SCHED_KV_SNAPKV] = "snapkv",
                                        [SCHED_KV_H2O] = "h2o"};
    return (unsigned)k <= SCHED_KV_H2O ? names[k] : "full";
}

const char *
srv_attn_kind_name(model_attn_kind_t k)
{
    static const char *const names[] = {[MODEL_ATTN_DENSE] = "dense",
                                        [MODEL_ATTN_SINK_WINDOW] = "sink-window",
                                        [MODEL_ATTN_DELTA] = "delta",
                                        [MODEL_ATTN_BLOCK_SPARSE] = "block-sparse"};
    return (unsigned)k <= MODEL_ATTN_BLOCK_SPARSE ? names[k] : "dense";
}

int
srv_kv_opt(const char *cmd, int opt, const char *arg, srv_kv_opts_t *o)
{
    switch (opt) {
    case SRV_O_KVDTYPE:
        if (strcmp(arg, "f16") == 0 || strcmp(arg, "f32") == 0) {
            o->dtype = strcmp(arg, "f16") == 0 ? KERN_F16 : KERN_F32;
            o->quant = KERN_KVQ_NONE;
            return 0;
        }
        for (int q = KERN_KVQ_NONE + 1; q < KERN_KVQ_COUNT; q++)
            if (strcmp(arg, kern_kvq_name((kern_kvq_t)q)) == 0) {
                o->dtype = KERN_F16;
                o->quant = (kern_kvq_t)q;
                return 0;
            }
        fprintf(stderr,
                "kvserve %s: --kv-cache-dtype: '%s' is not one of f16, f32, bf16, q8_0, fp8, q4\n",
                cmd, arg);
        return KVS_EINVAL;
    case SRV_O_KVSINKS:
        return srv_parse_u32(cmd, "--kv-sink-tokens", arg, 0, 1u << 20, &o->sink_tokens);
    case SRV_O_KVPOLICY:
        for (int k = SCHED_KV_FULL; k <= SCHED_KV_H2O; k++)
            if (strcmp(arg, srv_kv_policy_name((sched_kv_kind_t)k)) == 0) {
                o->policy.kind = (sched_kv_kind_t)k;
                return 0;
            }
        fprintf(stderr,
                "kvserve %s: --kv-policy: '%s' is not one of full, sink-eviction, snapkv, h2o\n",
                cmd, arg);
        return KVS_EINVAL;
    case SRV_O_KVBUDGET:
        return srv_parse_u32(cmd, "--kv-budget", arg, 1, 1u << 30, &o->policy.budget_tokens);
    case SRV_O_KVEVSINKS:
        return srv_parse_u32(cmd, "--kv-evict-sinks", arg, 0, 1u << 20, &o->policy.sinks);
    case SRV_O_SNAPWIN:
        return srv_parse_u32(cmd, "--snapkv-window", arg, 1, 1024, &o->policy.window);
    case SRV_O_H2ORECENT:
        return srv_parse_u32(cmd, "--h2o-recent", arg, 1, 1u << 30, &o->h2o_recent);
    case SRV_O_KVRESID:
        return srv_parse_u32(cmd, "--kv-residual-tokens", arg, 0, 1u << 20, &o->residual_tokens);
    case SRV_O_HOSTMEM:
        return srv_parse_bytes(cmd, "--host-kv-memory", arg, &o->host_bytes);
    default:
        return 1;
    }
}

int
srv_kv_finish(const char *cmd, srv_kv_opts_t *o, uint32_t block_tokens)
{
    sched_kv_policy_t *p = &o->policy;
    if (p->kind == SCHED_KV_FULL) {
        if (p->budget_tokens) {
            fprintf(stderr,
                    "kvserve %s: --kv-budget: needs --kv-policy sink-eviction, snapkv or h2o\n",
                    cmd);
            return KVS_EINVAL;
        }
        return 0;
    }
    if (p->budget_tokens == 0) {
        fprintf(stderr, "kvserve %s: --kv-policy %s needs --kv-budget N\n", cmd,
                srv_kv_policy_name(p->kind));
        return KVS_EINVAL;
    }
    uint32_t bt = block_tokens;
    if (p->kind == SCHED_KV_SINK_EVICTION && p->budget_tokens < sched_kv_min_budget(p->sinks, bt)) {
        fprintf(stderr,
                "kvserve %s: --kv-budget: %u cannot hold the %u sink tokens' blocks and one block "
                "of %u recent tokens\n",
                cmd, p->budget_tokens, p->sinks, bt);
        return KVS_EINVAL;
    }
    if (o->h2o_recent && p->kind != SCHED_KV_H2O) {
        fprintf(stderr, "kvserve %s: --h2o-recent: needs --kv-policy h2o\n", cmd);
        return KVS_EINVAL;
    }
    if (p->kind == SCHED_KV_H2O) {
        /* H2O reads window as its recent share; 0 is budget / 2. */
        p->window = o->h2o_recent;
        if (p->window >= p->budget_tokens) {
            fprintf(stderr, "kvserve %s: --h2o-recent: %u must be below --kv-budget %u\n", cmd,
                    p->window, p->budget_tokens);
            return KVS_EINVAL;
        }
    }
    if (p->kind == SCHED_KV_SNAPKV && p->budget_tokens <= p->window) {
        fprintf(stderr, "kvserve %s: --kv-budget: %u must exceed --snapkv-window %u\n", cmd,
                p->budget_tokens, p->window);
        return KVS_EINVAL;
    }
    return 0;
}

void
srv_kv_apply(const srv_kv_opts_t *o, sched_cfg_t *c)
{
    c->kv_dtype = o->dtype;
    c->kv_quant = o->quant;
    c->kv_sink_tokens = o->sink_tokens;
    c->kv_residual_tokens = o->residual_tokens;
    c->host_kv_bytes = (size_t)o->host_bytes;
}

const char *
srv_kv_name(const srv_kv_opts_t *o)
{
    if (o->quant != KERN_KVQ_NONE)
        return kern_kvq_name(o->quant);
    return o->dtype == KERN_F32 ? "f32" : "f16";
}

const char *
srv_kv_describe(const srv_kv_opts_t *o, char *buf, size_t cap)
{
    char pol[64] = "";
    const sched_kv_policy_t *p = &o->policy;
    if (p->kind == SCHED_KV_SINK_EVICTION)
        snprintf(pol, sizeof pol, ", sink-eviction(%u sinks, budget %u)", p->sinks,
                 p->budget_tokens);
    else if (p->kind == SCHED_KV_SNAPKV)
        snprintf(pol, sizeof pol, ", snapkv(budget %u, window %u)", p->budget_tokens, p->window);
    else if (p->kind == SCHED_KV_H2O)
        snprintf(pol, sizeof pol, ", h2o(budget %u, recent %u)", p->budget_tokens,
                 p->window ? p->window : p->budget_tokens / 2);
    if (o->quant == KERN_KVQ_NONE)
        snprintf(buf, cap, "%s%s", srv_kv_name(o), pol);
    else
        snprintf(buf, cap, "%s (%u sink tokens exact)%s", srv_kv_name(o), o->sink_tokens, pol);
    return buf;
}

int
srv_parse_block_size(const char *cmd, const char *s, uint32_t *out)
{
    uint32_t v;
    if (srv_parse_u32(cmd, "--block-size", s, 1, 1024, &v))
        return KVS_EINVAL;
    if (v & (v - 1)) {
        fprintf(stderr, "kvserve %s: --block-size: %u is not a power of two\n", cmd, v);
        return KVS_EINVAL;
    }
    *out = v;
    return 0;
}

int
srv_parse_tokens(const char *cmd, const char *flag, const char *s, int32_t **out, size_t *n)
{
    size_t cap = 1;
    for (const char *p = s; *p; p++)
        cap += *p == ',';
    int32_t *ids = malloc(cap * sizeof *ids);
    if (ids == NULL)
        return KVS_ENOMEM;
    size_t k = 0;
    const char *p = s;
    while (*p) {
        char *end;
        errno = 0;
        long long v = strtoll(p, &end, 10);
        if (end == p || errno || v < 0 || v > INT32_MAX || (*end != ',' && *end != '\0')) {
            fprintf(stderr, "kvserve %s: %s: bad token id at '%s' (expected 1,2,3)\n", cmd, flag,
                    p);
            free(ids);
            return KVS_EINVAL;
        }
        ids[k++] = (int32_t)v;
        p = *end == ',' ? end + 1 : end;
    }
    if (k == 0) {
        fprintf(stderr, "kvserve %s: %s: no token ids given\n", cmd, flag);
        free(ids);
        return KVS_EINVAL;
    }
    *out = ids;
    *n = k;
    return 0;
}

int
srv_parse_logit_bias(const char *cmd, const char *s, int32_t **ids, float **bias, uint32_t *n)
{
    size_t cap = 1;
    for (const char *p = s; *p; p++)
        cap += *p == ',';
    if (cap > MODEL_MAX_LOGIT_BIAS) {
        fprintf(stderr, "kvserve %s: --logit-bias: %zu pairs, at most %d\n", cmd, cap,
                MODEL_MAX_LOGIT_BIAS);
        return KVS_EINVAL;
    }
    int32_t *id = malloc(cap * sizeof *id);
    float *b = malloc(cap * sizeof *b);
    if (!id || !b) {
        free(id);
        free(b);
        return KVS_ENOMEM;
    }
    uint32_t k = 0;
    for (const char *p = s; *p;) {
        char *end, *bend;
        errno = 0;
        long long v = strtoll(p, &end, 10);
        float x = *end == ':' ? strtof(end + 1, &bend) : NAN;
        if (end == p || errno || v < 0 || v >= INT32_MAX || *end != ':' || bend == end + 1 ||
            (*bend != ',' && *bend != '\0') || !(fabsf(x) <= MODEL_LOGIT_BIAS_MAX)) {
            fprintf(stderr,
                    "kvserve %s: --logit-bias: bad pair at '%s' (expected ID:BIAS,... with BIAS "
                    "in [-%g, %g])\n",
                    cmd, p, MODEL_LOGIT_BIAS_MAX, MODEL_LOGIT_BIAS_MAX);
            free(id);
            free(b);
            return KVS_EINVAL;
        }
        id[k] = (int32_t)v;
        b[k++] = x;
        p = *bend == ',' ? bend + 1 : bend;
    }
    if (k == 0) {
        fprintf(stderr, "kvserve %s: --logit-bias: no pairs given\n", cmd);
        free(id);
        free(b);
        return KVS_EINVAL;
    }
    *ids = id;
    *bias = b;
    *n = k;
    return 0;
}

/* Bytes of the well-formed UTF-8 sequence at s (of n bytes), 0 when none
 * starts there; *bad then says how many bytes the ill-formed part spans
 * (its maximal subpart, as Unicode's U+FFFD substitution counts). */
static size_t
utf8_seq(const unsigned char *s, size_t n, size_t *bad)
{
    unsigned c = s[0];
    *bad = 1;
    if (c >= 0x01 && c < 0x80)
        return 1;
    size_t k = c >= 0xc2 && c <= 0xdf   ? 2
               : c >= 0xe0 && c <= 0xef ? 3
               : c >= 0xf0 && c <= 0xf4 ? 4
                                        : 0;
    if (k == 0)
        return 0; /* NUL (a C string's end), a continuation byte, C0, C1, F5..FF */
    /* The second byte's range excludes overlongs, surrogates and code
     * points past U+10FFFF. */
    unsigned lo = c == 0xe0 ? 0xa0 : c == 0xf0 ? 0x90 : 0x80;
    unsigned hi = c == 0xed ? 0x9f : c == 0xf4 ? 0x8f : 0xbf;
    for (size_t j = 1; j < k; j++) {
        unsigned b = j < n ? s[j] : 0;
        if (j == 1 ? b < lo || b > hi : (b & 0xc0) != 0x80) {
            *bad = j;
            return 0;
        }
    }
    return k;
}

void
srv_json_str(FILE *f, const char *s, size_t len)
{
    fputc('"', f);
    for (size_t i = 0; i < len; i++) {
        unsigned char c = (unsigned char)s[i];
        switch (c) {
        case '"':
            fputs("\\\"", f);
            break;
        case '\\':
            fputs("\\\\", f);
            break;
        case '\n':
            fputs("\\n", f);
            break;
        case '\r':
            fputs("\\r", f);
            break;
        case '\t':
            fputs("\\t", f);
            break;
        default: {
            /* Characters go out as they are (JSON is UTF-8); a byte that
             * starts none (a token that splits a character, a
             * byte-level token) as the code point of its value: always
             * valid JSON, and the byte still readable. */
            size_t bad, k = c >= 0x80 ? utf8_seq((const unsigned char *)s + i, len - i, &bad) : 0;
            if (k) {
                fwrite(s + i, 1, k, f);
                i += k - 1;
            } else if (c < 0x20 || c >= 0x7f) {
                fprintf(f, "\\u%04x", c);
            } else {
                fputc(c, f);
            }
        }
        }
    }
    fputc('"', f);
}

const char *
srv_default_model(void)
{
    static char path[PATH_MAX];
    const char *env = getenv("KVSERVE_MODEL");
    if (env && *env)
        return env;
    static const char *const candidates[] = {
        "weights/kvserve-main.gguf",
        KVS_SOURCE_DIR "/weights/kvserve-main.gguf",
        KVS_INSTALL_PREFIX "/share/kvserve/kvserve-main.gguf",
    };
    for (size_t i = 0; i < sizeof candidates / sizeof candidates[0]; i++) {
        if (access(candidates[i], R_OK) == 0) {
            snprintf(path, sizeof path, "%s", candidates[i]);
            return path;
        }
    }
    return NULL;
}

int
srv_attn_opt(const char *cmd, int opt, const char *arg, model_attn_policy_t *p)
{
    switch (opt) {
    case SRV_O_ATTN:
        for (int k = MODEL_ATTN_DENSE; k <= MODEL_ATTN_BLOCK_SPARSE; k++)
            if (strcmp(arg, srv_attn_kind_name((model_attn_kind_t)k)) == 0) {
                p->kind = (model_attn_kind_t)k;
                return 0;
            }
        fprintf(stderr,
                "kvserve %s: --attention: '%s' is not one of dense, sink-window, delta, "
                "block-sparse\n",
                cmd, arg);
        return KVS_EINVAL;
    case SRV_O_SINKS:
        return srv_parse_u32(cmd, "--attn-sinks", arg, 0, 1u << 24, &p->sinks);
    case SRV_O_WINDOW:
        return srv_parse_u32(cmd, "--attn-window", arg, 1, 1u << 24, &p->window);
    case SRV_O_GAMMA:
        return srv_parse_u32(cmd, "--delta-gamma", arg, 1, 1u << 20, &p->gamma);
    case SRV_O_NOTAIL:
        p->no_tail = true;
        return 0;
    case SRV_O_LASTDENSE:
        p->last_dense = true;
        return 0;
    case SRV_O_TOPK:
        /* Like --attn-sinks, accepted with any kind and used by one. */
        return srv_parse_u32(cmd, "--attn-top-k", arg, 1, 1u << 24, &p->top_k);
    case SRV_O_DECTOPK:
        return srv_parse_u32(cmd, "--decode-top-k", arg, 0, 1u << 24, &p->decode_top_k);
    default:
        return 1;
    }
}

int
srv_prefill_opt(const char *cmd, int opt, const char *arg, model_spec_policy_t *p)
{
    switch (opt) {
    case SRV_O_PREFILL:
        if (strcmp(arg, "full") == 0)
            p->on = false;
        else if (strcmp(arg, "speculative") == 0)
            p->on = true;
        else {
            fprintf(stderr, "kvserve %s: --prefill: '%s' is not one of full, speculative\n", cmd,
                    arg);
            return KVS_EINVAL;
        }
        return 0;
    case SRV_O_KEEP: {
        int rc = srv_parse_f32(cmd, "--keep-ratio", arg, 0.0f, 1.0f, &p->keep_ratio);
        if (rc == 0 && p->keep_ratio == 0.0f) {
            fprintf(stderr, "kvserve %s: --keep-ratio: must be above 0\n", cmd);
            rc = KVS_EINVAL;
        }
        return rc;
    }
    case SRV_O_LOOKAHEAD:
        return srv_parse_u32(cmd, "--look-ahead", arg, 1, 64, &p->look_ahead);
    case SRV_O_SPECCHUNK:
        return srv_parse_u32(cmd, "--spec-chunk", arg, 1, 65536, &p->chunk);
    default:
        return 1;
    }
}

int
srv_prefill_finish(const char *cmd, model_spec_policy_t *p, bool have_draft)
{
    if (!p->on && (p->keep_ratio != 0.0f || p->look_ahead || p->chunk)) {
        fprintf(stderr,
                "kvserve %s: --keep-ratio, --look-ahead and --spec-chunk go with --prefill "
                "speculative\n",
                cmd);
        return KVS_EINVAL;
    }
    if (p->on && !have_draft) {
        fprintf(stderr, "kvserve %s: --prefill speculative needs --draft-model\n", cmd);
        return KVS_EINVAL;
    }
    model_spec_policy_defaults(p);
    return model_spec_policy_check(p);
}

int
srv_specdec_opt(const char *cmd, int opt, const char *arg, srv_specdec_opts_t *o)
{
    switch (opt) {
    case SRV_O_NUMSPEC:
        return srv_parse_u32(cmd, "--num-speculative-tokens", arg, 0, SCHED_MAX_SPEC_TOKENS,
                             &o->num_tokens);
    case SRV_O_PLMAX:
        return srv_parse_u32(cmd, "--prompt-lookup-max", arg, 1, SCHED_MAX_PROMPT_LOOKUP,
                             &o->lookup_max);
    case SRV_O_PLMIN:
        return srv_parse_u32(cmd, "--prompt-lookup-min", arg, 1, SCHED_MAX_PROMPT_LOOKUP,
                             &o->lookup_min);
    case SRV_O_SPECMETHOD:
        if (strcmp(arg, "ngram") != 0 && strcmp(arg, "draft") != 0) {
            fprintf(stderr, "kvserve %s: --speculative-method must be ngram or draft, not '%s'\n",
                    cmd, arg);
            return KVS_EINVAL;
        }
        o->method = arg;
        o->draft = strcmp(arg, "draft") == 0;
        return 0;
    case SRV_O_SPECOFF:
        return srv_parse_u32(cmd, "--speculative-disable-by-batch-size", arg, 1, 1u << 20,
                             &o->disable_batch);
    case SRV_O_SPECACCEPT:
        if (strcmp(arg, "exact") != 0 && strcmp(arg, "rejection") != 0) {
            fprintf(stderr,
                    "kvserve %s: --speculative-acceptance must be exact or rejection, not '%s'\n",
                    cmd, arg);
            return KVS_EINVAL;
        }
        o->acceptance = arg;
        o->rejection = strcmp(arg, "rejection") == 0;
        return 0;
    default:
        return 1;
    }
}

int
srv_specdec_finish(const char *cmd, srv_specdec_opts_t *o, bool have_draft)
{
    if (o->num_tokens == 0 &&
        (o->lookup_max || o->lookup_min || o->method || o->disable_batch || o->acceptance)) {
        fprintf(stderr,
                "kvserve %s: --speculative-method, --speculative-acceptance, "
                "--speculative-disable-by-batch-size, --prompt-lookup-max and --prompt-lookup-min "
                "go with --num-speculative-tokens N (N > 0)\n",
                cmd);
        return KVS_EINVAL;
    }
    if (o->num_tokens == 0)
        return 0;
    if (o->draft && (o->lookup_max || o->lookup_min)) {
        fprintf(stderr,
                "kvserve %s: --prompt-lookup-max and --prompt-lookup-min go with "
                "--speculative-method ngram\n",
                cmd);
        return KVS_EINVAL;
    }
    if (o->draft && !have_draft) {
        fprintf(stderr, "kvserve %s: --speculative-method draft needs --draft-model\n", cmd);
        return KVS_EINVAL;
    }
    if (o->acceptance && !o->draft) {
        /* A lookup's proposal is one token for sure: the exact check is
         * rejection sampling already. */
        fprintf(stderr,
                "kvserve %s: --speculative-acceptance goes with --speculative-method draft\n", cmd);
        return KVS_EINVAL;
    }
    /* Defaults as sched_new fills them; a minimum given alone may pass the
     * default maximum, and is refused naming both. */
    uint32_t max = o->lookup_max ? o->lookup_max : SCHED_DEFAULT_PROMPT_LOOKUP_MAX;
    uint32_t min = o->lookup_min ? o->lookup_min : SCHED_DEFAULT_PROMPT_LOOKUP_MIN;
    if (o->lookup_min == 0 && min > max)
        min = max;
    if (min > max) {
        fprintf(stderr, "kvserve %s: --prompt-lookup-min (%u) exceeds --prompt-lookup-max (%u%s)\n",
                cmd, min, max, o->lookup_max ? "" : ", the default");
        return KVS_EINVAL;
    }
    o->lookup_max = max;
    o->lookup_min = min;
    return 0;
}

void
srv_specdec_apply(const srv_specdec_opts_t *o, sched_cfg_t *c)
{
    c->num_speculative_tokens = o->num_tokens;
    c->spec_draft_model = o->num_tokens && o->draft;
    c->spec_rejection = c->spec_draft_model && o->rejection;
    c->spec_disable_batch = o->num_tokens ? o->disable_batch : 0;
    c->prompt_lookup_max = o->num_tokens ? o->lookup_max : 0;
    c->prompt_lookup_min = o->num_tokens ? o->lookup_min : 0;
}

const char *
srv_specdec_summary(const srv_specdec_opts_t *o, uint64_t draft, uint64_t accepted, char *buf,
                    size_t cap)
{
    if (o->num_tokens == 0) {
        if (cap)
            buf[0] = '\0';
    } else
        snprintf(buf, cap, "; speculative decoding accepted %llu of %llu proposed tokens (%.1f%%)",
                 (unsigned long long)accepted, (unsigned long long)draft,
                 draft ? 100.0 * (double)accepted / (double)draft : 0.0);
    return buf;
}

const char *
srv_prefill_describe(const model_spec_policy_t *p, char *buf, size_t cap)
{
    if (p->on)
        snprintf(buf, cap, "speculative(keep %g, look-ahead %u, chunk %u)", p->keep_ratio,
                 p->look_ahead, p->chunk);
    else
        snprintf(buf, cap, "full");
    return buf;
}

int
srv_load_draft(const char *cmd, const char *path, model_t *main_model, model_t **out)
{
    char err[512];
    model_t *d;
    int rc = model_load(path, model_backend(main_model), &d, err, sizeof err);
    if (rc) {
        fprintf(stderr, "kvserve %s: cannot load draft model '%s': %s\n", cmd, path, err);
        return rc;
    }
    /* The draft reads the main model's token ids, so both must mean the
     * same strings by them. */
    uint32_t n = model_hparams(main_model)->n_vocab;
    const char *why = NULL;
    if (model_hparams(d)->n_vocab != n)
        why = "its vocabulary size differs";
    else if (strcmp(model_tokenizer_name(d), model_tokenizer_name(main_model)) != 0)
        why = "its tokenizer differs";
    /* Whole pieces: tokens can differ past any fixed length. */
    srv_buf_t a = {0}, b = {0};
    for (uint32_t i = 0; why == NULL && i < n; i++) {
        a.len = b.len = 0;
        srv_buf_put_token(&a, main_model, (int32_t)i);
        srv_buf_put_token(&b, d, (int32_t)i);
        if (a.oom || b.oom)
            why = "out of memory comparing its tokens";
        else if (a.len != b.len || (a.len > 0 && memcmp(a.p, b.p, a.len) != 0))
            why = "its tokens differ";
    }
    free(a.p);
    free(b.p);
    if (why) {
        fprintf(stderr, "kvserve %s: --draft-model '%s' cannot draft for the main model: %s\n", cmd,
                path, why);
        model_free(d);
        return KVS_EINVAL;
    }
    *out = d;
    return 0;
}

int
srv_attn_finish(const char *cmd, model_attn_policy_t *p)
{
    if (p->no_tail && p->kind != MODEL_ATTN_DELTA) {
        fprintf(stderr, "kvserve %s: --no-delta-tail goes with --attention delta\n", cmd);
        return KVS_EINVAL;
    }
    if (p->last_dense && p->kind != MODEL_ATTN_SINK_WINDOW &&
        !(p->kind == MODEL_ATTN_DELTA && p->no_tail)) {
        fprintf(stderr,
                "kvserve %s: --attn-last-dense goes with --attention sink-window, or delta "
                "with --no-delta-tail\n",
                cmd);
        return KVS_EINVAL;
    }
    return model_attn_policy_check(p);
}

const char *
srv_attn_describe(const model_attn_policy_t *p, char *buf, size_t cap)
{
    if (p->decode_top_k && cap > 0) {
        model_attn_policy_t pre = *p;
        pre.decode_top_k = 0;
        char tmp[128];
        snprintf(buf, cap, "%s, decode top %u", srv_attn_describe(&pre, tmp, sizeof tmp),
                 p->decode_top_k);
        return buf;
    }
    switch (p->kind) {
    case MODEL_ATTN_SINK_WINDOW:
        snprintf(buf, cap, "sink-window(%u+%u%s)", p->sinks, p->window,
                 p->last_dense ? ", last row dense" : "");
        break;
    case MODEL_ATTN_DELTA:
        snprintf(buf, cap, "delta(%u+%u, gamma %u%s%s)", p->sinks, p->window, p->gamma,
                 p->no_tail ? ", no tail" : "", p->last_dense ? ", last row dense" : "");
        break;
    case MODEL_ATTN_BLOCK_SPARSE:
        snprintf(buf, cap, "block-sparse(%u+%u, top %u)", p->sinks, p->window, p->top_k);
        break;
    default:
        snprintf(buf, cap, "dense");
    }
    return buf;
}

char *
srv_read_stream(FILE *f, size_t *len)
{
    size_t cap = 1 << 16, n = 0;
    char *buf = malloc(cap);
    while (buf) {
        size_t r = fread(buf + n, 1, cap - n - 1, f);
        n += r;
        if (r == 0)
            break;
        if (n + 1 == cap) {
            char *b = realloc(buf, cap *= 2);
            if (b == NULL)
                free(buf);
            buf = b;
        }
    }
    if (buf == NULL || ferror(f)) {
        free(buf);
        return NULL;
    }
    buf[n] = '\0';
    if (len)
        *len = n;
    return buf;
}

char *
srv_read_file(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    if (f == NULL)
        return NULL;
    char *buf = srv_read_stream(f, len);
    fclose(f);
    return buf;
}

int
srv_parse_text_arg(const char *cmd, const char *flag, const char *s, char **out)
{
    *out = s[0] == '@' ? srv_read_file(s + 1, NULL) : strdup(s);
    if (*out)
        return 0;
    if (s[0] != '@') {
        fprintf(stderr, "kvserve %s: out of memory\n", cmd);
        return KVS_ENOMEM;
    }
    fprintf(stderr, "kvserve %s: %s: cannot read '%s': %s\n", cmd, flag, s + 1, strerror(errno));
    return KVS_EINVAL;
}

int
srv_guided_opt(const char *cmd, int opt, const char *arg, srv_guided_opts_t *g)
{
    switch (opt) {
    case SRV_O_GREGEX:
        g->regex = arg;
        return 0;
    case SRV_O_GWS:
        g->ws = arg;
        return 0;
    case SRV_O_GJSON:
        free(g->json);
        return srv_parse_text_arg(cmd, "--guided-json", arg, &g->json);
    case SRV_O_GGRAMMAR:
        free(g->grammar);
        return srv_parse_text_arg(cmd, "--guided-grammar", arg, &g->grammar);
    default:
        return 1;
    }
}

int
srv_guided_check(const char *cmd, const srv_guided_opts_t *g, uint32_t n_other)
{
    const char *why = NULL;
    if (n_other + (g->regex != NULL) + (g->json != NULL) + (g->grammar != NULL) > 1)
        why = "--guided-choice, --guided-regex, --guided-json and --guided-grammar: one at most";
    else if (g->ws && !g->json)
        why = "--guided-whitespace-pattern: only with --guided-json";
    if (why == NULL)
        return 0;
    fprintf(stderr, "kvserve %s: %s\n", cmd, why);
    return KVS_EINVAL;
}

void
srv_guided_free(srv_guided_opts_t *g)
{
    free(g->json);
    free(g->grammar);
    g->json = g->grammar = NULL;
}

/* Room for n more bytes and the NUL after them; false (oom set) when
 * memory runs out or ran out before. */
static bool
buf_room(srv_buf_t *b, size_t n)
{
    if (b->oom)
        return false;
    if (b->len + n + 1 > b->cap) {
        size_t cap = (b->len + n + 1) * 2;
        char *p = realloc(b->p, cap);
        if (p == NULL) {
            b->oom = true;
            return false;
        }
        b->p = p;
        b->cap = cap;
    }
    return true;
}

void
srv_buf_put(srv_buf_t *b, const char *s, size_t n)
{
    if (!buf_room(b, n))
        return;
    memcpy(b->p + b->len, s, n);
    b->len += n;
    b->p[b->len] = '\0';
}

void
srv_buf_puts(srv_buf_t *b, const char *s)
{
    srv_buf_put(b, s, strlen(s));
}

char *
srv_utf8_valid(const char *s, size_t n)
{
    const unsigned char *p = (const unsigned char *)s;
    char *out = malloc(3 * n + 1), *o = out;
    if (out == NULL)
        return NULL;
    for (size_t i = 0; i < n;) {
        size_t bad, k = utf8_seq(p + i, n - i, &bad);
        if (k) {
            memcpy(o, p + i, k);
            o += k;
            i += k;
        } else {
            memcpy(o, "\xef\xbf\xbd", 3); /* U+FFFD */
            o += 3;
            i += bad;
        }
    }
    *o = '\0';
    return out;
}

void
srv_buf_put_piece(srv_buf_t *b, const model_vocab_t *v, int32_t tok, bool special)
{
    /* The piece's length first (room 0), then the piece in place. */
    char none;
    int n = model_vocab_piece(v, tok, special, &none, 0);
    if (n <= 0 || !buf_room(b, (size_t)n))
        return;
    b->len += (size_t)model_vocab_piece(v, tok, special, b->p + b->len, (size_t)n);
    b->p[b->len] = '\0';
}

void
srv_buf_put_token(srv_buf_t *b, const model_t *m, int32_t tok)
{
    srv_buf_put_piece(b, model_vocab(m), tok, false);
}

int
srv_parse_u32_list(const char *cmd, const char *flag, const char *s, uint32_t lo, uint32_t hi,
                   uint32_t *out, uint32_t max, uint32_t *n)
{
    char *dup = strdup(s), *save = NULL;
    int rc = dup ? 0 : KVS_ENOMEM;
    *n = 0;
    for (char *t = dup ? strtok_r(dup, ",", &save) : NULL; t && rc == 0;
         t = strtok_r(NULL, ",", &save))
        rc = *n == max ? KVS_EINVAL : srv_parse_u32(cmd, flag, t, lo, hi, &out[(*n)++]);
    free(dup);
    return rc ? rc : *n ? 0 : KVS_EINVAL;
}

int
srv_engine_opt(const char *cmd, int opt, const char *arg, srv_engine_opts_t *o)
{
    switch (opt) {
    case SRV_O_THREADS:
        return srv_parse_u32(cmd, "--threads", arg, 1, 1024, &o->threads);
    case SRV_O_DEVICE:
        o->device = arg;
        return 0;
    case SRV_O_SEQS:
        return srv_parse_u32(cmd, "--max-num-seqs", arg, 1, 4096, &o->max_seqs);
    case SRV_O_BATCHED:
        return srv_parse_u32(cmd, "--max-num-batched-tokens", arg, 16, 1u << 20, &o->max_tokens);
    case SRV_O_BLOCK:
        return srv_parse_block_size(cmd, arg, &o->block_size);
    case SRV_O_SAMPLETH:
        return srv_parse_u32(cmd, "--sample-threads", arg, 0, SCHED_MAX_SAMPLE_THREADS,
                             &o->sample_threads);
    default:
        return 1;
    }
}

sched_cfg_t
srv_engine_cfg(const srv_engine_opts_t *e, const srv_kv_opts_t *kv, uint32_t max_len)
{
    uint32_t per_seq = (max_len + e->block_size - 1) / e->block_size + 1;
    sched_cfg_t c = {.max_num_seqs = e->max_seqs,
                     .max_num_batched_tokens = e->max_tokens,
                     .max_model_len = max_len,
                     .block_tokens = e->block_size,
                     .n_blocks = per_seq * e->max_seqs,
                     .sample_threads = e->sample_threads};
    srv_kv_apply(kv, &c);
    if (kv->quant != KERN_KVQ_NONE) {
        c.kv_hot_blocks = sched_default_hot_blocks(&c);
        c.n_blocks += c.kv_hot_blocks;
    }
    return c;
}
