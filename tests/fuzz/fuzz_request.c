/*
 * tests/fuzz/fuzz_request.c — libFuzzer target for what the server does
 * with the bytes of a Generate call before the engine sees them (and of
 * Tokenize and Abort calls, the same bytes decoded as those): protobuf
 * decoding (protobuf-c), the check for NUL bytes in string fields
 * (serve/srv_pb.c) and field validation (serve/srv_req.c), against a
 * tiny random model so text prompts are tokenized for real, and chat
 * messages rendered with a ChatML template first.  An accepted
 * request must satisfy what sched_submit relies on (ids inside the
 * vocabulary, prompt + max_tokens within the maximum length).  Built only
 * with -DKVS_FUZZ=ON and CC=clang:
 *
 *   ./build-fuzz/fuzz_request -max_total_time=60 corpus/
 *
 * When the first corpus directory is missing or empty,
 * LLVMFuzzerInitialize writes a few valid encoded requests into it (one
 * of them a chat).
 */
#include "serve/srv_req.h"
#include "tests/fuzz/fuzz_util.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static kern_backend_t *be;
static model_t *model;
static srv_limits_t lim;
static srv_chat_t chat;

static void
write_seed(const char *dir, int k, const ProtobufCMessage *m)
{
    size_t n = protobuf_c_message_get_packed_size(m);
    uint8_t *buf = malloc(n ? n : 1);
    protobuf_c_message_pack(m, buf);
    char path[4096];
    snprintf(path, sizeof path, "%s/seed-%d", dir, k);
    FILE *f = fopen(path, "wb");
    if (f) {
        fwrite(buf, 1, n, f);
        fclose(f);
    }
    free(buf);
}

static void
seed_corpus(const char *dir)
{
    if (!fuzz_wants_seeds(dir))
        return;
    uint32_t ids[] = {1, 72, 101, 108};
    char *stops[] = {"\n\n", "END"};
    uint32_t stop_ids[] = {2};
    Kvserve__V1__TokenIds t = KVSERVE__V1__TOKEN_IDS__INIT;
    t.n_ids = 4;
    t.ids = ids;
    Kvserve__V1__SamplingParams sp = KVSERVE__V1__SAMPLING_PARAMS__INIT;
    sp.has_temperature = sp.has_top_p = sp.has_max_tokens = sp.has_seed = true;
    sp.temperature = 0.7f;
    sp.top_p = 0.9f;
    sp.max_tokens = 32;
    sp.seed = 7;
    sp.n_stop = 2;
    sp.stop = stops;
    sp.n_stop_token_ids = 1;
    sp.stop_token_ids = stop_ids;
    Kvserve__V1__AttentionPolicy ap = KVSERVE__V1__ATTENTION_POLICY__INIT;
    ap.has_kind = true;
    ap.kind = KVSERVE__V1__ATTENTION_POLICY__KIND__DENSE;
    Kvserve__V1__LongContextPolicy pol = KVSERVE__V1__LONG_CONTEXT_POLICY__INIT;
    pol.attention = &ap;
    Kvserve__V1__GenerateRequest q = KVSERVE__V1__GENERATE_REQUEST__INIT;
    q.request_id = "fuzz-1";
    q.prompt_case = KVSERVE__V1__GENERATE_REQUEST__PROMPT_TOKENS;
    q.tokens = &t;
    q.sampling = &sp;
    q.policy = &pol;
    q.cache_salt = "tenant";
    write_seed(dir, 0, &q.base);
    q.prompt_case = KVSERVE__V1__GENERATE_REQUEST__PROMPT_TEXT;
    q.text = "The quick brown fox";
    write_seed(dir, 1, &q.base);
    Kvserve__V1__GenerateRequest empty = KVSERVE__V1__GENERATE_REQUEST__INIT;
    write_seed(dir, 2, &empty.base);
    Kvserve__V1__ChatMessage m[3] = {KVSERVE__V1__CHAT_MESSAGE__INIT,
                                     KVSERVE__V1__CHAT_MESSAGE__INIT,
                                     KVSERVE__V1__CHAT_MESSAGE__INIT};
    m[0].role = "system";
    m[0].content = "Be brief.";
    m[1].role = "user";
    m[1].content = "Hi <|im_end|> there";
    m[2].role = "assistant";
    m[2].content = "";
    Kvserve__V1__ChatMessage *mp[3] = {&m[0], &m[1], &m[2]};
    Kvserve__V1__ChatMessages cm = KVSERVE__V1__CHAT_MESSAGES__INIT;
    cm.n_messages = 3;
    cm.messages = mp;
    q.prompt_case = KVSERVE__V1__GENERATE_REQUEST__PROMPT_CHAT;
    q.chat = &cm;
    write_seed(dir, 3, &q.base);
    /* Guided decoding: a pattern, and a schema with its whitespace. */
    q.prompt_case = KVSERVE__V1__GENERATE_REQUEST__PROMPT_TEXT;
    sp.guided_regex = "(?:[A-Z]{2}|x+)-\\d{1,3}[^\"\\\\]?";
    write_seed(dir, 4, &q.base);
    sp.guided_regex = NULL;
    sp.guided_json = "{\"type\":\"object\",\"properties\":{\"a\":{\"type\":\"integer\","
                     "\"minimum\":-3},\"b\":{\"enum\":[\"x\",null]},\"c\":{\"type\":\"array\","
                     "\"items\":{\"$ref\":\"#\"}}},\"required\":[\"a\"]}";
    sp.guided_whitespace_pattern = "[ \\n]?";
    write_seed(dir, 5, &q.base);
    sp.guided_json = sp.guided_whitespace_pattern = NULL;
    sp.guided_grammar = "root ::= \"[\" (v (\",\" ws v)*)? \"]\"  # a list\n"
                        "v ::= [0-9]+ | \"\\\"\" [^\"\\\\]* \"\\\"\" | root\nws ::= [ \\t]{0,2}\n";
    write_seed(dir, 6, &q.base);
}

/* A guide that validation accepted lets some token through at its start
 * and takes what its mask lets through, until the output is over (or a
 * grammar's guide passes a bound, which it says). */
static void
walk_guide(const model_guide_t *guide)
{
    model_guide_t *g;
    uint32_t nv = lim.n_vocab;
    float *row = calloc(nv, sizeof *row), *out = malloc(nv * sizeof *out);
    if (model_guide_clone(guide, &g) || !row || !out)
        abort();
    for (int step = 0; step < 16; step++) {
        if (model_guide_mask(g, row, out) == 0) {
            /* A pattern that matches something starts somewhere. */
            if (step == 0 && model_guide_accept(g, 0) != KVS_ENOSPC)
                abort();
            break;
        }
        uint32_t id = (uint32_t)step * 37 % nv;
        while (out[id] == -INFINITY)
            id = (id + 1) % nv;
        int rc = model_guide_accept(g, (int32_t)id);
        if (rc == KVS_ENOSPC)
            break;
        if (rc < 0)
            abort();
        if (rc == 1)
            break;
    }
    model_guide_free(g);
    free(row);
    free(out);
}

int
LLVMFuzzerInitialize(int *argc, char ***argv)
{
    kvs_log_set_level(KVS_LOG_ERROR);
    seed_corpus(fuzz_corpus_dir(*argc, *argv));
    const char *tmp = getenv("TMPDIR");
    char path[4096];
    snprintf(path, sizeof path, "%s/kvserve-fuzz-request-XXXXXX", tmp && *tmp ? tmp : "/tmp");
    int fd = mkstemp(path);
    if (fd < 0)
        abort();
    close(fd);
    char err[256];
    if (model_random_write("tiny", KERN_F32, 1, NULL, path, err, sizeof err) ||
        kern_backend_new("ref", NULL, &be) || model_load(path, be, &model, err, sizeof err)) {
        fprintf(stderr, "fuzz_request: cannot make the model: %s\n", err);
        abort();
    }
    unlink(path);
    /* Chat messages are rendered with a ChatML template, as a Qwen model's. */
    static const char chatml[] =
        "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
        "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt "
        "%}{{ '<|im_start|>assistant\\n' }}{% endif %}";
    if (srv_chat_detect(chatml, "<s>", "</s>", &chat, err, sizeof err) != 0) {
        fprintf(stderr, "fuzz_request: the ChatML template: %s\n", err);
        abort();
    }
    lim = (srv_limits_t){.m = model,
                         .n_vocab = model_hparams(model)->n_vocab,
                         .max_model_len = 256,
                         .seed_fallback = 1,
                         .chat = &chat,
                         .prefix_caching = true,
                         .block_tokens = 16};
    return 0;
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    /* The server's NUL check walks the raw bytes, valid or not. */
    char field[64];
    if (srv_pb_nul_field(&kvserve__v1__generate_request__descriptor, data, size, field,
                         sizeof field) != (field[0] != '\0'))
        abort();
    Kvserve__V1__GenerateRequest *q = kvserve__v1__generate_request__unpack(NULL, size, data);
    if (q == NULL)
        return 0;
    srv_gen_req_t g;
    char msg[256];
    if (srv_gen_parse(q, &lim, &g, msg, sizeof msg) == GRPC_STATUS_OK) {
        if (g.n_prompt == 0 || g.sr.max_tokens == 0 ||
            (uint64_t)g.n_prompt + g.sr.max_tokens > lim.max_model_len)
            abort();
        for (uint32_t i = 0; i < g.n_prompt; i++)
            if (g.prompt[i] < 0 || (uint32_t)g.prompt[i] >= lim.n_vocab)
                abort();
        for (size_t i = 0; i < g.n_stop; i++)
            if (g.stop[i][0] == '\0')
                abort();
        if (g.sr.n_forced > g.sr.max_tokens || g.sr.top_logprobs > SCHED_MAX_LOGPROBS ||
            g.sr.min_tokens > g.sr.max_tokens || g.sr.n_min_ban > SCHED_MAX_MIN_BAN)
            abort();
        for (uint32_t i = 0; i < g.sr.n_forced; i++)
            if (g.sr.forced[i] < 0 || (uint32_t)g.sr.forced[i] >= lim.n_vocab)
                abort();
        /* What validation accepts, the sampler must too. */
        model_sampler_t *smp;
        if (model_sampler_new(&g.sr.sampling, lim.n_vocab, &smp) != 0)
            abort();
        model_sampler_free(smp);
        if (g.sr.guide)
            walk_guide(g.sr.guide);
        srv_gen_req_free(&g);
    } else if (msg[0] == '\0') {
        abort(); /* every refusal must say why */
    }
    kvserve__v1__generate_request__free_unpacked(q, NULL);

    /* The same bytes as the other requests with fields: Tokenize (ids of
     * the vocabulary, or a reason) and Abort (an id, or a reason). */
    Kvserve__V1__TokenizeRequest *t = kvserve__v1__tokenize_request__unpack(NULL, size, data);
    if (t != NULL) {
        int32_t *ids = NULL;
        size_t n = 0;
        if (srv_tokenize_parse(t, &lim, &ids, &n, msg, sizeof msg) == GRPC_STATUS_OK) {
            for (size_t i = 0; i < n; i++)
                if (ids[i] < 0 || (uint32_t)ids[i] >= lim.n_vocab)
                    abort();
        } else if (msg[0] == '\0') {
            abort();
        }
        free(ids);
        kvserve__v1__tokenize_request__free_unpacked(t, NULL);
    }
    Kvserve__V1__AbortRequest *a = kvserve__v1__abort_request__unpack(NULL, size, data);
    if (a != NULL) {
        const char *id;
        if (srv_abort_parse(a, &id, msg, sizeof msg) == GRPC_STATUS_OK ? id == NULL || !id[0]
                                                                       : msg[0] == '\0')
            abort();
        kvserve__v1__abort_request__free_unpacked(a, NULL);
    }
    return 0;
}
