/*
 * tests/serve/test_srv_schema.c — srv_schema_regex: every regex it returns
 * compiles under PCRE2 (UTF, anchored at both ends, the full-match
 * semantics of model/guide.c), and accepts exactly the JSON texts the
 * schema allows: lists of texts that must and must not match for each
 * feature, integer ranges checked value by value around their bounds, all
 * subsets of optional properties, bounded recursion, whitespace variants,
 * and the message (pointer and keyword) of every refusal.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "base/kvs.h"
#include "serve/srv_schema.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <limits.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static long n_texts; /* texts matched against a regex, over the whole run */

/* NULL-terminated lists of JSON texts. */
#define L(...) ((const char *const[]){__VA_ARGS__, NULL})
#define NONE ((const char *const[]){NULL})

typedef struct rx {
    char *re;
    pcre2_code *code;
    pcre2_match_data *md;
    const char *schema;
} rx_t;

static char *
regex_of(const char *schema, const char *ws)
{
    char err[512];
    char *re = NULL;
    int rc = srv_schema_regex(schema, strlen(schema), ws, &re, err, sizeof err);
    if (rc != 0)
        fail_msg("schema %s: rc %d: %s", schema, rc, err);
    assert_non_null(re);
    return re;
}

static void
rx_open(rx_t *r, const char *schema, const char *ws)
{
    r->schema = schema;
    r->re = regex_of(schema, ws);
    int ec;
    PCRE2_SIZE off;
    r->code = pcre2_compile((PCRE2_SPTR)r->re, PCRE2_ZERO_TERMINATED,
                            PCRE2_UTF | PCRE2_ANCHORED | PCRE2_ENDANCHORED, &ec, &off, NULL);
    if (r->code == NULL) {
        PCRE2_UCHAR msg[256];
        pcre2_get_error_message(ec, msg, sizeof msg);
        fail_msg("schema %s: pcre2: %s at %zu of %.2000s", schema, (char *)msg, (size_t)off, r->re);
    }
    r->md = pcre2_match_data_create_from_pattern(r->code, NULL);
    assert_non_null(r->md);
}

static bool
rx_match(rx_t *r, const char *text)
{
    int rc = pcre2_match(r->code, (PCRE2_SPTR)text, strlen(text), 0, 0, r->md, NULL);
    if (rc < 0 && rc != PCRE2_ERROR_NOMATCH)
        fail_msg("schema %s: pcre2_match %d on %s", r->schema, rc, text);
    n_texts++;
    return rc >= 0;
}

static void
rx_close(rx_t *r)
{
    pcre2_match_data_free(r->md);
    pcre2_code_free(r->code);
    free(r->re);
}

static void
expect(rx_t *r, const char *text, bool want)
{
    if (rx_match(r, text) != want)
        fail_msg("%s: %s\n  schema %s\n  regex %.3000s", want ? "should match" : "should not match",
                 text, r->schema, r->re);
}

static void
check_ws(const char *schema, const char *ws, const char *const *yes, const char *const *no)
{
    rx_t r;
    rx_open(&r, schema, ws);
    for (; *yes != NULL; yes++)
        expect(&r, *yes, true);
    for (; *no != NULL; no++)
        expect(&r, *no, false);
    rx_close(&r);
}

/* Whitespace wide enough for the pretty-printed texts below (the
 * default, SRV_SCHEMA_WS, is one space at most). */
#define WIDE_WS "[ \\t\\n\\r]{0,16}"

static void
check(const char *schema, const char *const *yes, const char *const *no)
{
    check_ws(schema, WIDE_WS, yes, no);
}

/* Refused with KVS_EINVAL, the message naming where and what. */
static void
check_err(const char *schema, const char *where, const char *what)
{
    char err[512] = "";
    char *re = (char *)0x1;
    int rc = srv_schema_regex(schema, strlen(schema), NULL, &re, err, sizeof err);
    if (rc != KVS_EINVAL)
        fail_msg("schema %s: rc %d, want KVS_EINVAL", schema, rc);
    assert_null(re);
    if (strstr(err, where) == NULL || strstr(err, what) == NULL)
        fail_msg("schema %s: message \"%s\" lacks \"%s\" or \"%s\"", schema, err, where, what);
}

/* ------------------------------------------------------------------------ */

static void
test_types(void **state)
{
    (void)state;
    check("{\"type\":\"string\"}", L("\"\"", "\"abc\"", "\"a b\""),
          L("abc", "\"a", "\"a\"\"", "\"\"\"\"", "", " \"a\""));
    check("{\"type\":\"integer\"}", L("0", "-0", "12", "-12", "1234567890123456789012"),
          L("01", "+1", "1.0", "1e5", "-", "", " 1", "1 ", "--1", "0x1"));
    check("{\"type\":\"number\"}",
          L("0", "-0.5", "1.25e-3", "1E+9", "10", "-0", "0.0", "123.456e789"),
          L(".5", "1.", "01", "+1", "1e", "NaN", "Infinity", "-", "1.e5", "0x10", "1_000"));
    check("{\"type\":\"boolean\"}", L("true", "false"), L("True", "1", "\"true\"", "truefalse"));
    check("{\"type\":\"null\"}", L("null"), L("nul", "Null", "\"null\"", ""));
    check("{\"type\":[\"string\",\"null\"]}", L("\"x\"", "null"), L("1", "true"));
    check("{\"type\":[\"integer\",\"number\"]}", L("1", "1.5", "-2e3"), L("\"1\""));
    check("{\"type\":[\"boolean\",\"array\"],\"items\":{\"type\":\"null\"}}",
          L("true", "[]", "[null,null]"), L("[1]", "null"));
    /* No type: inferred from the keywords, else anything. */
    check("{\"title\":\"x\",\"description\":\"y\",\"x-vendor\":1}",
          L("1", "\"s\"", "null", "[1,{\"a\":[]}]"), L("", "[1,]"));
    check("{\"properties\":{\"a\":{\"type\":\"integer\"}}}", L("{}", "{\"a\":1}"),
          L("1", "[]", "{\"b\":1}"));
    check("{\"items\":{\"type\":\"integer\"}}", L("[]", "[1,2]"), L("{}", "[\"a\"]"));
    check("{\"minLength\":2}", L("\"ab\""), L("\"a\"", "12"));
    check("{\"minimum\":0}", L("0", "1.5"), L("-1", "\"a\""));
}

static void
test_enum_const(void **state)
{
    (void)state;
    check("{\"enum\":[\"red\",\"green\",\"blue\"],\"title\":\"Color\",\"type\":\"string\"}",
          L("\"red\"", "\"green\"", "\"blue\""), L("\"Red\"", "\"re\"", "red", "\"redgreen\""));
    /* Escapes, non-ASCII and regex metacharacters are literal. */
    check("{\"enum\":[\"a\\\"b\",\"c\\\\d\",\"e\\nf\",\"tab\\t\","
          "\"\xc3\xbc\xe2\x82\xac\xf0\x9f\x98\x80\","
          "\"x.y*z\",\"(a|b)\",\"\\u0001\"]}",
          L("\"a\\\"b\"", "\"c\\\\d\"", "\"e\\nf\"", "\"tab\\t\"",
            "\"\xc3\xbc\xe2\x82\xac\xf0\x9f\x98\x80\"", "\"x.y*z\"", "\"(a|b)\"", "\"\\u0001\""),
          L("\"a\"b\"", "\"xAyz\"", "\"x.yyyz\"", "\"a\"", "\"e\nf\"", "\"c\\d\"", "\"\xc3\xbc\""));
    check("{\"enum\":[1,2.5,0.1,-3,1e300,null,true,[1,\"a\"],{\"k\":[]}]}",
          L("1", "2.5", "0.1", "-3", "1e+300", "null", "true", "[1,\"a\"]", "[ 1 , \"a\" ]",
            "{\"k\":[]}", "{ \"k\" : [ ] }"),
          L("2", "0.10000000000000001", "false", "[1]", "{\"k\":[1]}", "3", "[\"a\",1]"));
    /* type filters the values; const; const with enum intersects. */
    check("{\"type\":\"string\",\"enum\":[\"a\",1,null]}", L("\"a\""), L("1", "null"));
    check("{\"type\":\"integer\",\"enum\":[1,2.0,2.5]}", L("1", "2.0"), L("2.5"));
    check("{\"const\":\"x\"}", L("\"x\""), L("\"y\"", "x"));
    check("{\"const\":{\"a\":1,\"b\":[true]}}",
          L("{\"a\":1,\"b\":[true]}", "{\"a\": 1, \"b\": [true]}"),
          L("{\"b\":[true],\"a\":1}", "{\"a\":1}"));
    check("{\"const\":5,\"type\":\"integer\",\"title\":\"Five\"}", L("5"), L("6", "5.0"));
    check("{\"const\":\"b\",\"enum\":[\"a\",\"b\"]}", L("\"b\""), L("\"a\""));
}

static void
test_strings(void **state)
{
    (void)state;
    const char *s = "{\"type\":\"string\"}";
    check(s,
          L("\"\\\"\\\\\\/\\b\\f\\n\\r\\t\"", "\"\\u00e9\\uD83D\\uDE00\"",
            "\"\xc3\xbc\xe2\x82\xac\xf0\x9f\x98\x80\xe4\xb8\xad\"", "\"\\u0000\"", "\"'\""),
          L("\"a\nb\"", "\"a\tb\"", "\"\x01\"", "\"\\x\"", "\"\\u12\"", "\"\\u12G4\"", "\"a\\\"",
            "\"\\\"", "\"abc", "\"a\"b\"", "\"\\U0041\""));
    /* Lengths count characters: an escape or a multibyte character is one. */
    check("{\"type\":\"string\",\"minLength\":2,\"maxLength\":4}",
          L("\"ab\"", "\"abcd\"", "\"\xc3\xbc\xe2\x82\xac\"", "\"\\n\\t\"", "\"a\\u00e9\"",
            "\"\xf0\x9f\x98\x80\xf0\x9f\x98\x80\"", "\"\\\"\\\"\\\"\\\"\""),
          L("\"a\"", "\"abcde\"", "\"\xc3\xbc\"", "\"\\n\"", "\"\"", "\"\\\"\\\"\\\"\\\"\\\"\""));
    check("{\"type\":\"string\",\"maxLength\":0}", L("\"\""), L("\"a\""));
    check("{\"type\":\"string\",\"minLength\":3}", L("\"abc\"", "\"abcdefgh\""), L("\"ab\""));
    check("{\"type\":\"string\",\"maxLength\":1}", L("\"\"", "\"a\"", "\"\\\\\""), L("\"ab\""));
}

static void
test_pattern(void **state)
{
    (void)state;
    check("{\"type\":\"string\",\"pattern\":\"^[a-z]+-\\\\d{2}$\"}", L("\"abc-12\"", "\"z-00\""),
          L("\"abc-1\"", "\"ABC-12\"", "\"abc-123\"", "\"-12\"", "\"abc12\""));
    /* Characters that JSON escapes are written escaped. */
    check("{\"type\":\"string\",\"pattern\":\"a\\\"b\"}", L("\"a\\\"b\""), L("\"a\"b\"", "\"ab\""));
    check("{\"type\":\"string\",\"pattern\":\"x\\\\\\\\y\"}", L("\"x\\\\y\""),
          L("\"x\\y\"", "\"xy\""));
    check("{\"type\":\"string\",\"pattern\":\"[^a]\"}",
          L("\"\\\"\"", "\"\\\\\"", "\"\\n\"", "\"\\u0001\"", "\"\\u001f\"", "\"b\"",
            "\"\xc3\xa9\"", "\"\xf0\x9f\x98\x80\"", "\"/\""),
          L("\"a\"", "\"\"\"", "\"\\\"", "\"\n\"", "\"bb\"", "\"\""));
    check("{\"type\":\"string\",\"pattern\":\"[\\\\s]\"}",
          L("\" \"", "\"\\t\"", "\"\\n\"", "\"\\u000b\"", "\"\\f\"", "\"\\r\""),
          L("\"a\"", "\"\t\"", "\"\\u0009\""));
    /* . is anything but a newline; an escape is one character. */
    check("{\"type\":\"string\",\"pattern\":\"^.{3}$\"}",
          L("\"abc\"", "\"a\\\"b\"", "\"\xc3\xa9\xf0\x9f\x98\x80x\"", "\"a\\tb\""),
          L("\"ab\"", "\"abcd\"", "\"a\\nb\"", "\"a\nb\""));
    check("{\"type\":\"string\",\"pattern\":\"\\\\w+\\\\s\\\\S\\\\D\\\\W\"}",
          L("\"ab_1 x-.\"", "\"a\\tx- \""), L("\"ab x1.\"", "\"ab x-a\"", "\" x-.\""));
    check("{\"type\":\"string\",\"pattern\":\"(cat|dog)s?\"}", L("\"cat\"", "\"dogs\""),
          L("\"cow\"", "\"cats s\"", "\"catdog\""));
    check("{\"type\":\"string\",\"pattern\":\"(?:ab)+|c\"}", L("\"ab\"", "\"abab\"", "\"c\""),
          L("\"abc\"", "\"\"", "\"a\""));
    check("{\"type\":\"string\",\"pattern\":\"caf\\\\u00e9 \\\\x41\\\\uD83D\\\\uDE00\"}",
          L("\"caf\xc3\xa9 A\xf0\x9f\x98\x80\""), L("\"cafe A\xf0\x9f\x98\x80\""));
    check("{\"type\":\"string\",\"pattern\":\"\xc3\xbc+[\xce\xb1-\xcf\x89]{2}\"}",
          L("\"\xc3\xbc\xce\xb1\xce\xb2\"", "\"\xc3\xbc\xc3\xbc\xcf\x89\xcf\x89\""),
          L("\"\xc3\xbc"
            "ab\"",
            "\"\xce\xb1\xce\xb2\""));
    check("{\"type\":\"string\",\"pattern\":\"[a-cx-y0-2_]{2}\"}",
          L("\"ab\"", "\"cx\"", "\"y1\"", "\"2_\"", "\"bb\""),
          L("\"ad\"", "\"w0\"", "\"3a\"", "\"b\""));
    check("{\"type\":\"string\",\"pattern\":\"[\\\\]\\\\[\\\\-^.]+\"}", L("\"]-[^.\""),
          L("\"a\"", "\"\\\\\""));
    check("{\"type\":\"string\",\"pattern\":\"a{2,}b{1,2}c{2}\"}", L("\"aabcc\"", "\"aaaabbcc\""),
          L("\"abcc\"", "\"aabbbcc\"", "\"aabc\""));
    check("{\"type\":\"string\",\"pattern\":\"[^\\\"\\\\\\\\]*\"}", L("\"\"", "\"abc\"", "\"\\n\""),
          L("\"\\\"\"", "\"\\\\\""));
    check("{\"type\":\"string\",\"pattern\":\"\\\\.\\\\*\\\\/\\\\$\"}", L("\".*/$\""),
          L("\"a*/$\"", "\".\\/$\""));
    /* A negated class of 64 lone characters: its complement has 65
     * ranges, and taking out the controls, '"', '\\' and surrogates adds
     * four more, all within the set's room (plain text still matches). */
    char schema[512], cls[256];
    size_t n = 0;
    for (unsigned i = 0; i < 64; i++) {
        unsigned c = 0x61 + 2 * i;
        if (c < 0x80) {
            cls[n++] = (char)c;
        } else {
            cls[n++] = (char)(0xC0 | c >> 6);
            cls[n++] = (char)(0x80 | (c & 0x3F));
        }
    }
    cls[n] = '\0';
    snprintf(schema, sizeof schema, "{\"type\":\"string\",\"pattern\":\"^[^%s]+$\"}", cls);
    check(schema, L("\"A\"", "\" 0Z[\"", "\"b\\\"\\\\\\n\"", "\"\xc3\xa0\""),
          L("\"a\"", "\"Ac\"", "\"\xc3\x9f\"", "\"\""));
}

static void
test_formats(void **state)
{
    (void)state;
    check(
        "{\"type\":\"string\",\"format\":\"date\"}",
        L("\"2024-01-31\"", "\"2024-02-29\"", "\"2024-04-30\"", "\"1999-12-01\"", "\"0000-10-10\""),
        L("\"2024-13-01\"", "\"2024-00-10\"", "\"2024-04-31\"", "\"2024-02-30\"", "\"2024-1-01\"",
          "\"24-01-01\"", "\"2024-01-32\"", "\"2024-01-00\"", "2024-01-01"));
    check("{\"type\":\"string\",\"format\":\"time\"}",
          L("\"12:34:56z\"", "\"23:59:59.123Z\"", "\"00:00:00Z\"", "\"08:30:00+05:30\"",
            "\"08:30:00-02:00\""),
          L("\"24:00:00Z\"", "\"12:60:00Z\"", "\"12:00Z\"", "\"12:00:00+5:00\"", "\"12:00:60Z\"",
            "\"12:00:00.Z\"", "\"12:34:56\""));
    check("{\"type\":\"string\",\"format\":\"date-time\"}",
          L("\"2024-01-31T12:34:56Z\"", "\"2024-01-31t12:34:56.5+01:00\"",
            "\"2000-02-29T00:00:00z\""),
          L("\"2024-01-31T12:34:56\"", "\"2024-01-31 12:34:56Z\"", "\"2024-01-31\"",
            "\"2024-02-31T12:00:00Z\""));
    check("{\"type\":\"string\",\"format\":\"uuid\"}",
          L("\"123e4567-e89b-12d3-a456-426614174000\"", "\"123E4567-E89B-12D3-A456-426614174000\""),
          L("\"123e4567-e89b-12d3-a456\"", "\"123e4567-e89b-12d3-a456-42661417400g\"",
            "\"123e4567e89b12d3a456426614174000\""));
}

/* ------------------------------------------------------------------------ */
/* Integer ranges, value by value                                            */
/* ------------------------------------------------------------------------ */

static uint64_t lcg = 88172645463325252ULL;

static uint64_t
rnd(void)
{
    lcg ^= lcg << 13;
    lcg ^= lcg >> 7;
    lcg ^= lcg << 17;
    return lcg;
}

typedef struct irange {
    const char *kw; /* the bounds as schema keywords */
    bool hlo, hhi;
    long long lo, hi; /* what they mean */
} irange_t;

static bool
in_range(const irange_t *g, long long v)
{
    return (!g->hlo || v >= g->lo) && (!g->hhi || v <= g->hi);
}

static void
check_value(rx_t *r, const irange_t *g, long long v)
{
    char b[32];
    snprintf(b, sizeof b, "%lld", v);
    expect(r, b, in_range(g, v));
}

/* Every integer from a to b (saturating at the int64 ends). */
static void
check_window(rx_t *r, const irange_t *g, long long a, long long b)
{
    for (long long v = a;; v++) {
        check_value(r, g, v);
        if (v >= b)
            break;
    }
}

static long long
sat_add(long long a, long long d)
{
    if (d > 0 && a > LLONG_MAX - d)
        return LLONG_MAX;
    if (d < 0 && a < LLONG_MIN - d)
        return LLONG_MIN;
    return a + d;
}

static void
test_integer_ranges(void **state)
{
    (void)state;
    static const irange_t ranges[] = {
        {"\"minimum\":18", true, false, 18, 0},
        {"\"minimum\":-5,\"maximum\":7", true, true, -5, 7},
        {"\"minimum\":0,\"maximum\":100", true, true, 0, 100},
        {"\"maximum\":-10", false, true, 0, -10},
        {"\"minimum\":123,\"maximum\":4567", true, true, 123, 4567},
        {"\"minimum\":-4567,\"maximum\":-123", true, true, -4567, -123},
        {"\"exclusiveMinimum\":0", true, false, 1, 0},
        {"\"exclusiveMaximum\":0", false, true, 0, -1},
        {"\"minimum\":0", true, false, 0, 0},
        {"\"maximum\":0", false, true, 0, 0},
        {"\"minimum\":-100,\"exclusiveMaximum\":100", true, true, -100, 99},
        {"\"exclusiveMinimum\":9,\"exclusiveMaximum\":11", true, true, 10, 10},
        {"\"minimum\":0,\"maximum\":0", true, true, 0, 0},
        {"\"minimum\":-1,\"maximum\":-1", true, true, -1, -1},
        {"\"minimum\":99,\"maximum\":101", true, true, 99, 101},
        {"\"minimum\":-1000,\"maximum\":1000", true, true, -1000, 1000},
        {"\"minimum\":10,\"maximum\":99", true, true, 10, 99},
        {"\"minimum\":1,\"maximum\":9", true, true, 1, 9},
        {"\"minimum\":100", true, false, 100, 0},
        {"\"minimum\":1999,\"maximum\":2001", true, true, 1999, 2001},
        {"\"minimum\":-999", true, false, -999, 0},
        {"\"maximum\":1234", false, true, 0, 1234},
        {"\"minimum\":18.0,\"maximum\":6.5e1", true, true, 18, 65},
        {"\"minimum\":5,\"exclusiveMinimum\":7,\"maximum\":20,\"exclusiveMaximum\":15", true, true,
         8, 14},
        {"\"minimum\":9223372036854775000", true, false, 9223372036854775000LL, 0},
        {"\"maximum\":-9223372036854775000", false, true, 0, -9223372036854775000LL},
        {"\"minimum\":-9223372036854775808,\"maximum\":9223372036854775807", true, true, LLONG_MIN,
         LLONG_MAX},
        {"\"minimum\":1000000000000,\"maximum\":1000000000999", true, true, 1000000000000LL,
         1000000000999LL},
        {"\"minimum\":10,\"maximum\":29", true, true, 10, 29},
        {"\"minimum\":150,\"maximum\":350", true, true, 150, 350},
        {"\"minimum\":-350,\"maximum\":-150", true, true, -350, -150},
    };
    for (size_t i = 0; i < sizeof ranges / sizeof ranges[0]; i++) {
        const irange_t *g = &ranges[i];
        char schema[256];
        snprintf(schema, sizeof schema, "{\"type\":\"integer\",%s}", g->kw);
        rx_t r;
        rx_open(&r, schema, WIDE_WS);
        long long a = g->hlo ? g->lo : g->hi, b = g->hhi ? g->hi : g->lo;
        if (g->hlo && g->hhi && (unsigned long long)b - (unsigned long long)a > 6000) {
            check_window(&r, g, sat_add(a, -200), sat_add(a, 200));
            check_window(&r, g, sat_add(b, -200), sat_add(b, 200));
            check_window(&r, g, -200, 200);
        } else {
            check_window(&r, g, sat_add(a, -200), sat_add(b, 200));
        }
        /* Every power of ten and its neighbours, both signs. */
        for (int k = 0; k <= 18; k++) {
            long long p = 1;
            for (int j = 0; j < k; j++)
                p *= 10;
            for (long long d = -1; d <= 1; d++) {
                check_value(&r, g, p + d);
                check_value(&r, g, -(p + d));
            }
        }
        for (int k = 0; k < 3000; k++) {
            long long v = (long long)(rnd() >> (rnd() % 64));
            check_value(&r, g, rnd() & 1 ? v : -v);
        }
        check_value(&r, g, LLONG_MAX);
        check_value(&r, g, LLONG_MIN);
        /* Beyond int64, and spellings that are never canonical. */
        expect(&r, "9223372036854775808", !g->hhi);
        expect(&r, "123456789012345678901234", !g->hhi);
        expect(&r, "-9223372036854775809", !g->hlo);
        expect(&r, "-123456789012345678901234", !g->hlo);
        expect(&r, "-0", false);
        expect(&r, "+5", false);
        expect(&r, "007", false);
        expect(&r, "00", false);
        expect(&r, "1.0", false);
        expect(&r, "", false);
        expect(&r, "-", false);
        rx_close(&r);
    }
}

/* Random bounded and one-sided ranges, every value in and around them. */
static void
test_integer_random(void **state)
{
    (void)state;
    for (int i = 0; i < 60; i++) {
        irange_t g = {NULL, i % 3 != 1, i % 3 != 2, 0, 0};
        long long scale = i < 20 ? 100 : i < 40 ? 3000 : 100000;
        g.lo = (long long)(rnd() % (uint64_t)(2 * scale + 1)) - scale;
        g.hi = g.lo + (long long)(rnd() % (uint64_t)(scale < 3000 ? scale : 3000));
        char schema[128];
        int n = snprintf(schema, sizeof schema, "{\"type\":\"integer\"");
        if (g.hlo)
            n += snprintf(schema + n, sizeof schema - (size_t)n, ",\"minimum\":%lld", g.lo);
        if (g.hhi)
            n += snprintf(schema + n, sizeof schema - (size_t)n, ",\"maximum\":%lld", g.hi);
        snprintf(schema + n, sizeof schema - (size_t)n, "}");
        rx_t r;
        rx_open(&r, schema, WIDE_WS);
        check_window(&r, &g, g.lo - 300, g.hi + 300);
        rx_close(&r);
    }
}

static void
test_numbers(void **state)
{
    (void)state;
    check("{\"type\":\"number\",\"minimum\":0}",
          L("0", "0.0", "1.5", "3e10", "0e5", "12.5E-3", "100"),
          L("-1", "-0.5", "-0", "-0.0", ".5", "01"));
    const char *const pos_yes[] = {"1", "0.001", "5e-3", "10.0", "0.1e1", "0.00010", "7E+2", NULL};
    const char *const pos_no[] = {"0", "0.0", "0.000", "0e5", "-1", "-0.1", "0.", "00.1", NULL};
    check("{\"type\":\"number\",\"exclusiveMinimum\":0}", pos_yes, pos_no);
    check("{\"type\":\"number\",\"exclusiveMinimum\":0.0,\"minimum\":0}", pos_yes, pos_no);
    check("{\"type\":\"number\",\"minimum\":-0.0}", L("0", "2"), L("-2"));
}

/* ------------------------------------------------------------------------ */
/* Containers                                                                */
/* ------------------------------------------------------------------------ */

static void
test_arrays(void **state)
{
    (void)state;
    check("{\"type\":\"array\",\"items\":{\"type\":\"integer\"}}",
          L("[]", "[1]", "[1,2,3]", "[ 1 , 2 ]", "[\n  1,\n  2\n]", "[ ]"),
          L("[1,]", "[,1]", "[1 2]", "[\"a\"]", "[1,\"a\"]", "[[1]]", "[", "1", "[1,,2]"));
    check("{\"type\":\"array\",\"items\":{\"type\":\"integer\"},\"minItems\":2,\"maxItems\":3}",
          L("[1,2]", "[1,2,3]", "[1, 2, 3]"), L("[]", "[1]", "[1,2,3,4]"));
    check("{\"type\":\"array\",\"items\":{\"type\":\"string\"},\"minItems\":1}",
          L("[\"a\"]", "[\"a\",\"b\",\"c\",\"d\",\"e\"]"), L("[]", "[1]"));
    check("{\"type\":\"array\",\"items\":{\"type\":\"string\"},\"maxItems\":0}", L("[]", "[ ]"),
          L("[\"a\"]"));
    check("{\"type\":\"array\",\"items\":{\"type\":\"null\"},\"minItems\":2,\"maxItems\":2}",
          L("[null,null]"), L("[null]", "[null,null,null]"));
    check("{\"type\":\"array\",\"items\":{\"type\":\"null\"},\"maxItems\":1}", L("[]", "[null]"),
          L("[null,null]"));
    check("{\"type\":\"array\",\"items\":false}", L("[]"), L("[1]", "[null]"));
    check("{\"type\":\"array\",\"items\":{\"type\":\"array\",\"items\":{\"type\":\"integer\"}}}",
          L("[[1],[2,3],[]]", "[]", "[[]]"), L("[1]", "[[[1]]]", "[[\"a\"]]"));
    /* No items schema: any values, nesting 3 deep with the array itself. */
    check("{\"type\":\"array\"}", L("[1,\"a\",null,{\"b\":[true]}]", "[[[1]]]", "[]"),
          L("[[[[1]]]]", "[[[[]]]]", "[1,]", "{}"));
    /* Tuples: pydantic's Tuple[int, str]. */
    check("{\"type\":\"array\",\"prefixItems\":[{\"type\":\"integer\"},{\"type\":\"string\"}],"
          "\"minItems\":2,\"maxItems\":2}",
          L("[1,\"a\"]", "[ 1 , \"a\" ]"), L("[1]", "[1,\"a\",2]", "[\"a\",1]", "[]"));
    check("{\"type\":\"array\",\"prefixItems\":[{\"type\":\"integer\"},{\"type\":\"string\"}],"
          "\"items\":{\"type\":\"null\"}}",
          L("[]", "[1]", "[1,\"a\"]", "[1,\"a\",null,null]"),
          L("[1,\"a\",1]", "[\"a\"]", "[1,null]", "[null]"));
    check("{\"type\":\"array\",\"prefixItems\":[{\"type\":\"integer\"},{\"type\":\"string\"}],"
          "\"items\":{\"type\":\"boolean\"},\"minItems\":1,\"maxItems\":3}",
          L("[1]", "[1,\"a\"]", "[1,\"a\",true]"), L("[]", "[1,\"a\",true,false]", "[1,true]"));
    check("{\"type\":\"array\",\"prefixItems\":[{\"type\":\"integer\"}],"
          "\"items\":{\"type\":\"boolean\"},\"minItems\":3}",
          L("[1,true,false]", "[1,true,false,true]"), L("[1,true]", "[1]", "[]"));
    check("{\"type\":\"array\",\"prefixItems\":[{\"type\":\"integer\"}]}",
          L("[]", "[1]", "[1,\"x\",[2]]"), L("[\"x\"]"));
    check("{\"type\":\"array\",\"items\":[{\"type\":\"integer\"}],\"additionalItems\":false}",
          L("[]", "[1]"), L("[1,2]", "[\"a\"]"));
}

/* The object {...} with the properties whose bit is set in mask, in order. */
static void
object_text(char *b, size_t n, const char *const *members, int k, unsigned mask, const char *sep)
{
    size_t len = (size_t)snprintf(b, n, "{");
    bool first = true;
    for (int i = 0; i < k; i++) {
        if ((mask & 1u << i) == 0)
            continue;
        len += (size_t)snprintf(b + len, n - len, "%s%s", first ? "" : sep, members[i]);
        first = false;
    }
    snprintf(b + len, n - len, "}");
}

static void
check_subsets(const char *schema, unsigned required)
{
    static const char *const members[] = {"\"a\":1", "\"b\":\"x\"", "\"c\":true"};
    static const char *const reversed[] = {"\"c\":true", "\"b\":\"x\"", "\"a\":1"};
    rx_t r;
    rx_open(&r, schema, WIDE_WS);
    for (unsigned mask = 0; mask < 8; mask++) {
        char b[128];
        bool ok = (mask & required) == required;
        object_text(b, sizeof b, members, 3, mask, ",");
        expect(&r, b, ok);
        object_text(b, sizeof b, members, 3, mask, " ,\n  ");
        expect(&r, b, ok);
        /* Out of schema order: listed order is part of the contract. */
        unsigned rmask = (mask & 1) << 2 | (mask & 2) | (mask & 4) >> 2;
        object_text(b, sizeof b, reversed, 3, rmask, ",");
        expect(&r, b, ok && __builtin_popcount(mask) < 2);
        /* A trailing or leading comma, an unknown key, a repeated key. */
        if (mask != 0) {
            object_text(b, sizeof b, members, 3, mask, ",");
            char c[160];
            snprintf(c, sizeof c, "%.*s,}", (int)strlen(b) - 1, b);
            expect(&r, c, false);
            snprintf(c, sizeof c, "{,%s", b + 1);
            expect(&r, c, false);
            snprintf(c, sizeof c, "%.*s,\"d\":1}", (int)strlen(b) - 1, b);
            expect(&r, c, false);
            snprintf(c, sizeof c, "%.*s,%s}", (int)strlen(b) - 1, b,
                     members[31 - __builtin_clz(mask)]);
            expect(&r, c, false);
        }
    }
    expect(&r, "{\"a\":\"x\"}", false);
    expect(&r, "{\"a\":1 \"b\":\"x\"}", false);
    rx_close(&r);
}

static void
test_objects(void **state)
{
    (void)state;
    const char *props = "\"properties\":{\"a\":{\"type\":\"integer\"},\"b\":{\"type\":\"string\"},"
                        "\"c\":{\"type\":\"boolean\"}}";
    char schema[512];
    static const struct {
        const char *req;
        unsigned mask;
    } reqs[] = {{"", 0},
                {",\"required\":[\"b\"]", 2},
                {",\"required\":[\"a\"]", 1},
                {",\"required\":[\"c\"]", 4},
                {",\"required\":[\"a\",\"c\"]", 5},
                {",\"required\":[\"c\",\"b\",\"a\"]", 7}};
    for (size_t i = 0; i < sizeof reqs / sizeof reqs[0]; i++) {
        snprintf(schema, sizeof schema, "{\"type\":\"object\",%s%s}", props, reqs[i].req);
        check_subsets(schema, reqs[i].mask);
        snprintf(schema, sizeof schema, "{\"type\":\"object\",%s%s,\"additionalProperties\":false}",
                 props, reqs[i].req);
        check_subsets(schema, reqs[i].mask);
    }
    /* additionalProperties true still lists only the known keys (documented). */
    snprintf(schema, sizeof schema, "{\"type\":\"object\",%s,\"additionalProperties\":true}",
             props);
    check_subsets(schema, 0);

    check("{\"type\":\"object\",\"properties\":{\"p\":{\"type\":\"object\",\"properties\":"
          "{\"x\":{\"type\":\"integer\"},\"y\":{\"type\":\"integer\"}},\"required\":[\"x\"]}},"
          "\"required\":[\"p\"]}",
          L("{\"p\":{\"x\":1}}", "{\"p\":{\"x\":1,\"y\":2}}", "{ \"p\" : { \"x\" : 1 } }"),
          L("{\"p\":{}}", "{\"p\":{\"y\":2}}", "{}", "{\"p\":1}"));
    /* Maps. */
    check("{\"type\":\"object\",\"additionalProperties\":{\"type\":\"integer\"}}",
          L("{}", "{\"a\":1}", "{\"a\":1,\"b\":2}", "{\"a\\\"\":3}", "{\"\":1}"),
          L("{\"a\":\"x\"}", "{a:1}", "{\"a\":1,}", "[]"));
    check("{\"type\":\"object\",\"additionalProperties\":false}", L("{}", "{ }"), L("{\"a\":1}"));
    check("{\"type\":\"object\",\"properties\":{}}", L("{}"), L("{\"a\":1}"));
    /* Any object: values nest 2 more deep. */
    check("{\"type\":\"object\"}", L("{}", "{\"a\":[1,{\"b\":null}]}", "{\"a\":[[1]]}"),
          L("[]", "{\"a\":[[[1]]]}", "{\"a\":[[{}]]}"));
    check("{\"type\":\"object\",\"additionalProperties\":true}", L("{\"x\":{\"y\":2}}"), L("1"));
    /* Keys are JSON-escaped and regex-escaped. */
    check("{\"properties\":{\"a.b\\\"c/d~e\":{\"type\":\"integer\"}},"
          "\"required\":[\"a.b\\\"c/d~e\"]}",
          L("{\"a.b\\\"c/d~e\":1}"), L("{\"aXb\\\"c/d~e\":1}", "{\"a.b\"c/d~e\":1}"));
    /* A property whose schema is false may not appear. */
    check("{\"properties\":{\"a\":false,\"b\":{\"type\":\"integer\"}}}", L("{}", "{\"b\":1}"),
          L("{\"a\":1}"));
    /* Object in array in object. */
    check("{\"type\":\"object\",\"properties\":{\"xs\":{\"type\":\"array\",\"items\":"
          "{\"type\":\"object\",\"properties\":{\"n\":{\"type\":\"integer\"}},"
          "\"required\":[\"n\"]}}},\"required\":[\"xs\"]}",
          L("{\"xs\":[]}", "{\"xs\":[{\"n\":1},{\"n\":2}]}"),
          L("{\"xs\":[{}]}", "{\"xs\":[{\"n\":1},]}"));
}

/* ------------------------------------------------------------------------ */
/* $ref, combinators, any value                                             */
/* ------------------------------------------------------------------------ */

static void
test_refs(void **state)
{
    (void)state;
    check("{\"$defs\":{\"Pos\":{\"type\":\"integer\",\"minimum\":1}},\"type\":\"object\","
          "\"properties\":{\"n\":{\"$ref\":\"#/$defs/Pos\"}},\"required\":[\"n\"]}",
          L("{\"n\":1}", "{\"n\":99}"), L("{\"n\":0}", "{}"));
    check(
        "{\"definitions\":{\"S\":{\"type\":\"string\"}},\"items\":{\"$ref\":\"#/definitions/S\"}}",
        L("[\"a\"]"), L("[1]"));
    check("{\"$defs\":{\"a/b\":{\"const\":1},\"c~d\":{\"const\":2},\"e f\":{\"const\":3}},"
          "\"anyOf\":[{\"$ref\":\"#/$defs/a~1b\"},{\"$ref\":\"#/$defs/c~0d\"},"
          "{\"$ref\":\"#/$defs/e%20f\"}]}",
          L("1", "2", "3"), L("4"));
    check("{\"anyOf\":[{\"const\":\"x\"},{\"type\":\"array\",\"items\":{\"$ref\":\"#/anyOf/0\"}}]}",
          L("\"x\"", "[\"x\"]"), L("[\"y\"]", "[[\"x\"]]"));
    /* A tree: Node expands 3 times, the 4th level's children must be []. */
    const char *tree =
        "{\"$defs\":{\"Node\":{\"type\":\"object\",\"properties\":{\"value\":{\"type\":"
        "\"integer\"},\"children\":{\"type\":\"array\",\"items\":{\"$ref\":\"#/$defs/Node\"}}},"
        "\"required\":[\"value\",\"children\"]}},\"$ref\":\"#/$defs/Node\"}";
    check(tree,
          L("{\"value\":1,\"children\":[]}",
            "{\"value\":1,\"children\":[{\"value\":2,\"children\":[]}]}",
            "{\"value\":1,\"children\":[{\"value\":2,\"children\":[{\"value\":3,\"children\":[]},"
            "{\"value\":4,\"children\":[]}]},{\"value\":5,\"children\":[]}]}"),
          L("{\"value\":1}",
            "{\"value\":1,\"children\":[{\"value\":2,\"children\":[{\"value\":3,\"children\":[{"
            "\"value\":4,\"children\":[]}]}]}]}"));
    /* "#": a linked list through an optional property; root plus 3 expansions. */
    check("{\"type\":\"object\",\"properties\":{\"v\":{\"type\":\"integer\"},\"next\":"
          "{\"$ref\":\"#\"}},\"required\":[\"v\"]}",
          L("{\"v\":1}", "{\"v\":1,\"next\":{\"v\":2,\"next\":{\"v\":3,\"next\":{\"v\":4}}}}"),
          L("{\"v\":1,\"next\":{\"v\":2,\"next\":{\"v\":3,\"next\":{\"v\":4,\"next\":{\"v\":5}}}}}",
            "{\"v\":1,\"next\":{}}"));
    /* Recursion cut inside an anyOf branch (via minItems 1): the branch goes. */
    check("{\"$defs\":{\"E\":{\"anyOf\":[{\"type\":\"integer\"},{\"type\":\"array\",\"items\":"
          "{\"$ref\":\"#/$defs/E\"},\"minItems\":1}]}},\"$ref\":\"#/$defs/E\"}",
          L("1", "[1]", "[[1],2]", "[1,[2,3]]"), L("[]", "[[[1]]]", "[[]]"));
    /* Cut in an optional tuple member: the tuple ends before it. */
    check("{\"$defs\":{\"T\":{\"type\":\"array\",\"prefixItems\":[{\"type\":\"integer\"},"
          "{\"$ref\":\"#/$defs/T\"}],\"items\":false}},\"$ref\":\"#/$defs/T\"}",
          L("[]", "[1]", "[1,[]]", "[1,[2,[3]]]", "[1,[2,[]]]"),
          L("[1,[2,[3,[4]]]]", "[1,[2,[3,[]]]]", "[1,[2],3]", "[1,[2,[3],4]]"));
    /* pydantic: Optional[Self] list with a default. */
    check("{\"$defs\":{\"Item\":{\"properties\":{\"name\":{\"type\":\"string\"},\"sub\":"
          "{\"anyOf\":[{\"$ref\":\"#/$defs/Item\"},{\"type\":\"null\"}],\"default\":null}},"
          "\"required\":[\"name\"],\"type\":\"object\"}},\"$ref\":\"#/$defs/Item\"}",
          L("{\"name\":\"a\"}", "{\"name\":\"a\",\"sub\":null}",
            "{\"name\":\"a\",\"sub\":{\"name\":\"b\",\"sub\":{\"name\":\"c\",\"sub\":null}}}"),
          L("{\"name\":\"a\",\"sub\":{\"name\":\"b\",\"sub\":{\"name\":\"c\",\"sub\":"
            "{\"name\":\"d\"}}}}"));
}

static void
test_combinators(void **state)
{
    (void)state;
    check(
        "{\"anyOf\":[{\"type\":\"integer\"},{\"type\":\"null\"}],\"default\":null,\"title\":\"X\"}",
        L("1", "null"), L("\"1\"", "1.5"));
    check("{\"oneOf\":[{\"type\":\"string\",\"maxLength\":1},{\"type\":\"boolean\"}]}",
          L("\"a\"", "true"), L("\"ab\"", "1"));
    check("{\"allOf\":[{\"$ref\":\"#/$defs/X\"}],\"$defs\":{\"X\":{\"const\":\"x\"}},"
          "\"description\":\"d\"}",
          L("\"x\""), L("\"y\""));
    /* A discriminated union as pydantic writes it. */
    check(
        "{\"$defs\":{\"Cat\":{\"properties\":{\"kind\":{\"const\":\"cat\"},\"lives\":{\"type\":"
        "\"integer\"}},\"required\":[\"kind\",\"lives\"],\"type\":\"object\"},\"Dog\":"
        "{\"properties\":{\"kind\":{\"const\":\"dog\"},\"good\":{\"type\":\"boolean\"}},"
        "\"required\":[\"kind\",\"good\"],\"type\":\"object\"}},\"properties\":{\"pet\":"
        "{\"discriminator\":{\"propertyName\":\"kind\"},\"oneOf\":[{\"$ref\":\"#/$defs/Cat\"},"
        "{\"$ref\":\"#/$defs/Dog\"}]}},\"required\":[\"pet\"],\"type\":\"object\"}",
        L("{\"pet\":{\"kind\":\"cat\",\"lives\":9}}", "{\"pet\":{\"kind\":\"dog\",\"good\":true}}"),
        L("{\"pet\":{\"kind\":\"cat\",\"good\":true}}",
          "{\"pet\":{\"kind\":\"cow\",\"lives\":1}}"));
}

static void
test_any_depth(void **state)
{
    (void)state;
    const char *const yes[] = {"1",
                               "-2.5e3",
                               "\"s\\n\"",
                               "true",
                               "null",
                               "[]",
                               "{}",
                               "[[[1]]]",
                               "[[[]]]",
                               "{\"a\":{\"b\":{\"c\":1}}}",
                               "[{\"a\":[1]}]",
                               "{ \"a\" : [ 1 , { } ] }",
                               "[1,\"a\",null,true,false,{\"k\":\"v\"}]",
                               NULL};
    const char *const no[] = {"[[[[1]]]]", "[[[[]]]]", "{\"a\":{\"b\":{\"c\":{}}}}",
                              "[1,]",      "{\"a\"}",  "{\"a\":1,}",
                              "{1:2}",     "",         "[1 2]",
                              "undefined", " 1",       "'a'",
                              NULL};
    check("true", yes, no);
    check("{}", yes, no);
    char *re = regex_of("{}", NULL);
    printf("any value (depth 3): %zu bytes\n", strlen(re));
    assert_true(strlen(re) < 20000);
    free(re);
}

static void
test_whitespace(void **state)
{
    (void)state;
    const char *m =
        "{\"type\":\"object\",\"properties\":{\"a\":{\"type\":\"array\",\"items\":"
        "{\"type\":\"integer\"}},\"b\":{\"type\":\"string\"}},\"required\":[\"a\",\"b\"]}";
    const char *compact = "{\"a\":[1,2],\"b\":\"x\"}";
    const char *pretty = "{\n  \"a\": [\n    1,\n    2\n  ],\n  \"b\": \"x\"\n}";
    const char *tabs = "{\r\n\t\"a\" :\t[ 1 ,2 ] ,\t\"b\":\"x\"\r\n}";
    const char *spaced = "{\"a\": [1, 2], \"b\": \"x\"}";
    /* WIDE_WS allows 16 blanks in a row, not 17; the default one space. */
    char b16[64], b17[64];
    snprintf(b16, sizeof b16, "{%16s\"a\":[1,2],\"b\":\"x\"}", "");
    snprintf(b17, sizeof b17, "{%17s\"a\":[1,2],\"b\":\"x\"}", "");
    check(m, L(compact, pretty, tabs, spaced, b16),
          L(" {\"a\":[1,2],\"b\":\"x\"}", "{\"a\":[1,2],\"b\":\"x\"}\n", b17,
            "{\"a\":[1,2],\"b\":\"x\"\f}", "{\"a\":[1, 2],\"b\":\"x\"\xc2\xa0}"));
    check_ws(m, NULL, L(compact, spaced, "{ \"a\" : [ 1 , 2 ] , \"b\" : \"x\" }"),
             L(pretty, tabs, "{\"a\":  [1,2],\"b\":\"x\"}"));
    check_ws(m, "", L(compact), L(pretty, spaced, tabs));
    check_ws(m, " ?", L(compact, spaced, "{ \"a\" : [ 1 , 2 ] , \"b\" : \"x\" }"),
             L(pretty, "{\"a\":  [1,2],\"b\":\"x\"}"));
    /* An alternation in ws stays inside its own group. */
    check_ws(m, " ?|\\n {0,4}", L(compact, spaced, pretty, "{\n\"a\":\n    [1,2],\"b\":\"x\"}"),
             L("{\"a\":  [1,2],\"b\":\"x\"}", "{\n      \"a\":[1,2],\"b\":\"x\"}", tabs));
    char *def = regex_of(m, NULL), *explicit_ws = regex_of(m, SRV_SCHEMA_WS);
    assert_string_equal(def, explicit_ws);
    assert_non_null(strstr(def, SRV_SCHEMA_WS));
    free(def);
    free(explicit_ws);
    char *none = regex_of(m, "");
    assert_null(strstr(none, "[ \\t"));
    free(none);
}

/* A pydantic v2 model with five fields, as model_json_schema() writes it. */
static const char *const user_model =
    "{\"$defs\":{\"Role\":{\"enum\":[\"admin\",\"user\",\"guest\"],\"title\":\"Role\","
    "\"type\":\"string\"}},\"properties\":{\"name\":{\"maxLength\":50,\"title\":\"Name\","
    "\"type\":\"string\"},\"age\":{\"maximum\":150,\"minimum\":0,\"title\":\"Age\",\"type\":"
    "\"integer\"},\"email\":{\"anyOf\":[{\"type\":\"string\"},{\"type\":\"null\"}],"
    "\"default\":null,\"title\":\"Email\"},\"role\":{\"$ref\":\"#/$defs/Role\"},\"tags\":{"
    "\"items\":{\"type\":\"string\"},\"title\":\"Tags\",\"type\":\"array\"}},\"required\":["
    "\"name\",\"age\",\"role\"],\"title\":\"User\",\"type\":\"object\"}";

static void
test_pydantic(void **state)
{
    (void)state;
    check(user_model,
          L("{\"name\":\"Ann\",\"age\":42,\"role\":\"admin\"}",
            "{\n  \"name\": \"Bo\",\n  \"age\": 0,\n  \"email\": null,\n  \"role\": \"guest\",\n"
            "  \"tags\": [\"a\", \"b\"]\n}",
            "{\"name\":\"\",\"age\":150,\"email\":\"a@b.c\",\"role\":\"user\"}"),
          L("{\"name\":\"Ann\",\"age\":151,\"role\":\"admin\"}",
            "{\"name\":\"Ann\",\"age\":-1,\"role\":\"admin\"}",
            "{\"name\":\"Ann\",\"age\":4,\"role\":\"root\"}", "{\"name\":\"Ann\",\"age\":4}",
            "{\"age\":4,\"name\":\"Ann\",\"role\":\"user\"}",
            "{\"name\":\"Ann\",\"age\":4,\"role\":\"user\",\"extra\":1}"));
    char *re = regex_of(user_model, WIDE_WS);
    printf("pydantic 5-field model: %zu bytes\n", strlen(re));
    assert_true(strlen(re) < 4000);
    free(re);
}

/* ------------------------------------------------------------------------ */
/* Refusals                                                                  */
/* ------------------------------------------------------------------------ */

static void
test_errors(void **state)
{
    (void)state;
    static const struct {
        const char *schema, *where, *what;
    } cases[] = {
        {"{\"type\": }", "line 1 column", ""},
        {"{\"a\":1,\"a\":2}", "line 1", "duplicate"},
        {"5", "/", "a schema must be an object"},
        {"false", "/", "false"},
        {"{\"type\":\"foo\"}", "/", "type \"foo\""},
        {"{\"type\":[]}", "/", "type"},
        {"{\"type\":[\"string\",3]}", "/", "type"},
        {"{\"properties\":{\"age\":{\"type\":\"integer\",\"maximum\":1.5}}}", "/properties/age",
         "maximum 1.5 is not an integer"},
        {"{\"type\":\"integer\",\"minimum\":\"3\"}", "/", "minimum must be a number"},
        {"{\"type\":\"integer\",\"exclusiveMinimum\":true}", "/", "exclusiveMinimum"},
        {"{\"type\":\"integer\",\"minimum\":1e30}", "/", "minimum"},
        {"{\"type\":\"integer\",\"exclusiveMinimum\":5,\"maximum\":5}", "/", "minimum/maximum"},
        {"{\"type\":\"integer\",\"multipleOf\":2}", "/", "multipleOf is not supported"},
        {"{\"items\":{\"type\":\"array\",\"uniqueItems\":true}}", "/items", "uniqueItems"},
        {"{\"type\":\"number\",\"minimum\":1}", "/", "minimum 1 is not supported"},
        {"{\"type\":\"number\",\"maximum\":0}", "/", "maximum"},
        {"{\"type\":\"number\",\"exclusiveMaximum\":2.5}", "/", "exclusiveMaximum 2.5"},
        {"{\"type\":\"string\",\"maxLength\":1001}", "/", "maxLength 1001 exceeds"},
        {"{\"type\":\"string\",\"minLength\":-1}", "/", "minLength"},
        {"{\"type\":\"string\",\"minLength\":\"2\"}", "/", "minLength"},
        {"{\"type\":\"string\",\"minLength\":1.5}", "/", "minLength"},
        {"{\"type\":\"string\",\"minLength\":3,\"maxLength\":2}", "/", "minLength 3 exceeds"},
        {"{\"properties\":{\"e\":{\"type\":\"string\",\"format\":\"email\"}}}", "/properties/e",
         "format \"email\""},
        {"{\"type\":\"string\",\"format\":\"date\",\"maxLength\":3}", "/", "format"},
        {"{\"type\":\"string\",\"pattern\":\"a\",\"minLength\":1}", "/", "pattern"},
        {"{\"type\":\"string\",\"pattern\":\"a\",\"format\":\"date\"}", "/", "pattern"},
        {"{\"type\":\"string\",\"pattern\":5}", "/", "pattern"},
        {"{\"properties\":{\"p\":{\"pattern\":\"(?=a)b\"}}}", "/properties/p", "pattern"},
        {"{\"pattern\":\"(a)\\\\1\"}", "/", "pattern: backreferences"},
        {"{\"pattern\":\"a^b\"}", "/", "pattern: anchor ^"},
        {"{\"pattern\":\"a$b\"}", "/", "pattern: anchor $"},
        {"{\"pattern\":\"a*?\"}", "/", "pattern: lazy"},
        {"{\"pattern\":\"a++\"}", "/", "pattern: lazy, possessive"},
        {"{\"pattern\":\"\\\\bword\"}", "/", "pattern: word boundary"},
        {"{\"pattern\":\"[a\"}", "/", "pattern: unterminated"},
        {"{\"pattern\":\"a{1001}\"}", "/", "pattern: repeat count"},
        {"{\"pattern\":\"a{3,2}\"}", "/", "pattern: quantifier"},
        {"{\"pattern\":\"a{x}\"}", "/", "pattern: '{'"},
        {"{\"pattern\":\"\\\\p{L}\"}", "/", "pattern: this escape"},
        {"{\"pattern\":\"[[:alpha:]]\"}", "/", "pattern: POSIX"},
        {"{\"pattern\":\"*a\"}", "/", "pattern: quantifier without"},
        {"{\"pattern\":\"(a\"}", "/", "pattern: missing )"},
        {"{\"pattern\":\"a)\"}", "/", "pattern: unmatched )"},
        {"{\"pattern\":\"[z-a]\"}", "/", "pattern: range out of order"},
        {"{\"pattern\":\"[\\\\d-z]\"}", "/", "pattern: a range"},
        {"{\"pattern\":\"\\\\uD800\"}", "/", "pattern: lone surrogate"},
        {"{\"pattern\":\"\\\\\"}", "/", "pattern: trailing backslash"},
        {"{\"pattern\":\"\\\\x4\"}", "/", "pattern: "},
        {"{\"pattern\":\"\\\\012\"}", "/", "pattern: octal"},
        {"{\"pattern\":\"[^\\\\s\\\\S]\"}", "/", "pattern: class matches nothing"},
        {"{\"type\":\"array\",\"maxItems\":101}", "/", "maxItems 101 exceeds"},
        {"{\"type\":\"array\",\"minItems\":3,\"maxItems\":2}", "/", "minItems 3 exceeds"},
        {"{\"type\":\"array\",\"items\":false,\"minItems\":1}", "/", "minItems 1"},
        {"{\"type\":\"array\",\"prefixItems\":[{}],\"items\":false,\"minItems\":2}", "/",
         "minItems 2"},
        {"{\"type\":\"array\",\"prefixItems\":{}}", "/", "prefixItems must be an array"},
        {"{\"type\":\"array\",\"items\":[{}],\"prefixItems\":[{}]}", "/", "prefixItems"},
        {"{\"type\":\"array\",\"contains\":{}}", "/", "contains is not supported"},
        {"{\"prefixItems\":[{\"type\":\"string\",\"format\":\"ipv4\"}]}", "/prefixItems/0",
         "format"},
        {"{\"allOf\":[{},{}]}", "/", "allOf with 2"},
        {"{\"allOf\":[{}],\"type\":\"string\"}", "/", "type alongside allOf"},
        {"{\"type\":\"string\",\"anyOf\":[{\"minLength\":1}]}", "/", "type alongside anyOf"},
        {"{\"anyOf\":[]}", "/", "anyOf must be"},
        {"{\"anyOf\":[{}],\"oneOf\":[{}]}", "/", "anyOf alongside oneOf"},
        {"{\"oneOf\":[{\"type\":\"integer\"},{\"type\":\"integer\",\"multipleOf\":3}]}", "/oneOf/1",
         "multipleOf"},
        {"{\"$ref\":\"http://example.com/s.json\"}", "/", "$ref \"http://example.com/s.json\""},
        {"{\"$ref\":\"#/$defs/Nope\"}", "/", "does not resolve"},
        {"{\"$ref\":\"#Anchor\"}", "/", "anchors"},
        {"{\"$ref\":\"#/$defs/a~2\",\"$defs\":{}}", "/", "~-escape"},
        {"{\"$ref\":\"#/%zz\"}", "/", "%-escape"},
        {"{\"$ref\":5}", "/", "$ref must be a string"},
        {"{\"$ref\":\"#/$defs/A\",\"type\":\"object\",\"$defs\":{\"A\":{}}}", "/",
         "type alongside $ref"},
        {"{\"$defs\":{\"A\":{\"type\":\"string\",\"maxLength\":5000}},\"properties\":{\"a\":"
         "{\"$ref\":\"#/$defs/A\"}}}",
         "/$defs/A", "maxLength 5000"},
        {"{\"$defs\":{\"A\":{\"type\":\"object\",\"properties\":{\"a\":{\"$ref\":\"#/$defs/A\"}},"
         "\"required\":[\"a\"]}},\"$ref\":\"#/$defs/A\"}",
         "/$defs/A/properties/a", "recursive $ref \"#/$defs/A\""},
        {"{\"$defs\":{\"L\":{\"type\":\"array\",\"items\":{\"$ref\":\"#/$defs/L\"},"
         "\"minItems\":1}},\"$ref\":\"#/$defs/L\"}",
         "/$defs/L/items", "recursive $ref"},
        {"{\"$ref\":\"#\"}", "/", "recursive $ref \"#\""},
        {"{\"not\":{}}", "/", "not is not supported"},
        {"{\"if\":{},\"then\":{}}", "/", "if is not supported"},
        {"{\"type\":\"object\",\"patternProperties\":{}}", "/", "patternProperties"},
        {"{\"type\":\"object\",\"minProperties\":1}", "/", "minProperties"},
        {"{\"properties\":{\"a\":{}},\"required\":[\"b\"]}", "/",
         "required property \"b\" is not in properties"},
        {"{\"properties\":{\"a\":false},\"required\":[\"a\"]}", "/properties/a", "false"},
        {"{\"properties\":{\"a\":{}},\"additionalProperties\":{\"type\":\"integer\"}}", "/",
         "additionalProperties schema alongside properties"},
        {"{\"type\":\"object\",\"required\":[\"a\"]}", "/", "required without properties"},
        {"{\"properties\":[]}", "/", "properties must be an object"},
        {"{\"properties\":{},\"required\":[1]}", "/", "required must be"},
        {"{\"type\":\"object\",\"additionalProperties\":3}", "/", "additionalProperties must"},
        {"{\"enum\":[]}", "/", "enum must be"},
        {"{\"enum\":3}", "/", "enum must be"},
        {"{\"type\":\"integer\",\"enum\":[\"a\"]}", "/", "enum: no value"},
        {"{\"type\":\"integer\",\"const\":\"a\"}", "/", "const: no value"},
        {"{\"enum\":[\"a\"],\"minLength\":2}", "/", "minLength alongside enum"},
        {"{\"properties\":{\"x\":{\"properties\":{\"y\":{\"type\":\"string\",\"format\":\"uri\"}"
         "}}}}",
         "/properties/x/properties/y", "format \"uri\""},
        {"{\"properties\":{\"a~b/c\":{\"type\":\"strin\"}}}", "/properties/a~0b~1c", "type"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
        check_err(cases[i].schema, cases[i].where, cases[i].what);

    /* 33 levels of nesting are refused, 32 are fine (properties, as nested
       items would double the regex at each level). */
    char deep[1024] = "";
    for (int i = 0; i < 32; i++)
        strcat(deep, "{\"properties\":{\"a\":");
    strcat(deep, "{}");
    for (int i = 0; i < 32; i++)
        strcat(deep, "}}");
    check_err(deep, "/properties/a/properties/a", "nests deeper than 32");
    deep[0] = '\0';
    for (int i = 0; i < 31; i++)
        strcat(deep, "{\"properties\":{\"a\":");
    strcat(deep, "{\"type\":\"integer\"}");
    for (int i = 0; i < 31; i++)
        strcat(deep, "}}");
    char *re = regex_of(deep, NULL);
    free(re);

    /* More than 1 MiB of regex: 80 required any-valued properties. */
    char *big = malloc(4096);
    assert_non_null(big);
    size_t n = (size_t)sprintf(big, "{\"properties\":{");
    for (int i = 0; i < 80; i++)
        n += (size_t)sprintf(big + n, "%s\"p%d\":{}", i ? "," : "", i);
    n += (size_t)sprintf(big + n, "},\"required\":[");
    for (int i = 0; i < 80; i++)
        n += (size_t)sprintf(big + n, "%s\"p%d\"", i ? "," : "", i);
    sprintf(big + n, "]}");
    check_err(big, "/", "exceeds the limit");
    free(big);

    /* err may be NULL or tiny; out must be given. */
    char *out = NULL;
    assert_int_equal(srv_schema_regex("{\"not\":{}}", 10, NULL, &out, NULL, 0), KVS_EINVAL);
    assert_null(out);
    char tiny[4];
    assert_int_equal(srv_schema_regex("{\"not\":{}}", 10, NULL, &out, tiny, sizeof tiny),
                     KVS_EINVAL);
    assert_true(strlen(tiny) < sizeof tiny);
    assert_int_equal(srv_schema_regex("{}", 2, NULL, NULL, NULL, 0), KVS_EINVAL);
    /* len bounds the text: the rest is not read. */
    assert_int_equal(srv_schema_regex("{}garbage", 2, NULL, &out, NULL, 0), 0);
    free(out);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_types),          cmocka_unit_test(test_enum_const),
        cmocka_unit_test(test_strings),        cmocka_unit_test(test_pattern),
        cmocka_unit_test(test_formats),        cmocka_unit_test(test_integer_ranges),
        cmocka_unit_test(test_integer_random), cmocka_unit_test(test_numbers),
        cmocka_unit_test(test_arrays),         cmocka_unit_test(test_objects),
        cmocka_unit_test(test_refs),           cmocka_unit_test(test_combinators),
        cmocka_unit_test(test_any_depth),      cmocka_unit_test(test_whitespace),
        cmocka_unit_test(test_pydantic),       cmocka_unit_test(test_errors),
    };
    int rc = cmocka_run_group_tests(tests, NULL, NULL);
    printf("%ld texts matched\n", n_texts);
    return rc;
}
