#!/bin/sh
# The command-line contract of kvserve: every subcommand prints usage and
# exits non-zero on a bad flag, `run` generates from a random tiny model
# (text and ids, JSON, logits file), `model info` describes the file, and
# bad model files are refused with a message rather than a crash.
# Usage: cli.sh KVSERVE WORKDIR
set -u
K=$1
W=$2
rm -rf "$W" && mkdir -p "$W"
fails=0
pass=0

ok() { pass=$((pass + 1)); }
bad() { echo "FAIL: $*"; fails=$((fails + 1)); }

# expect CODE DESCRIPTION -- command...; stderr/stdout saved in $W/out
expect() {
    code=$1; shift; what=$1; shift
    "$@" >"$W/out" 2>&1
    rc=$?
    if [ "$rc" -eq "$code" ]; then ok; else bad "$what: exit $rc, expected $code"; sed 's/^/    /' "$W/out" | head -5; fi
}
contains() {
    if grep -q -- "$1" "$W/out"; then ok; else bad "output lacks '$1'"; sed 's/^/    /' "$W/out" | head -5; fi
}

expect 2 "no command" "$K"
expect 2 "unknown command" "$K" frobnicate
contains "unknown command"
expect 0 "help" "$K" --help
expect 0 "random tiny" "$K" model random --shape tiny --dtype q8_0 --seed 3 --out "$W/tiny.gguf"
expect 2 "random bad shape" "$K" model random --shape huge --dtype f16 --out "$W/x.gguf"
contains "unknown shape"
expect 2 "random bad dtype" "$K" model random --shape tiny --dtype f99 --out "$W/x.gguf"
expect 0 "info" "$K" model info "$W/tiny.gguf"
contains "blk.3.ffn_down.weight"
contains "RANDOM weights"
contains "tokenizer gpt2-bytes"
# model tokenize: ids of stdin's text, BOS as the vocabulary adds it.
printf 'Hi' | "$K" model tokenize --ids "$W/tiny.gguf" >"$W/out" 2>&1
if [ "$(cat "$W/out")" = "256 72 105" ]; then ok; else bad "tokenize --ids: '$(cat "$W/out")'"; fi
printf 'Hi' | "$K" model tokenize --ids --no-bos "$W/tiny.gguf" >"$W/out" 2>&1
if [ "$(cat "$W/out")" = "72 105" ]; then ok; else bad "tokenize --no-bos: '$(cat "$W/out")'"; fi
expect 2 "tokenize without a path" "$K" model tokenize
expect 1 "tokenize a missing file" "$K" model tokenize "$W/none.gguf"

M="--model $W/tiny.gguf"
expect 0 "run text" "$K" run $M --prompt "The grass is" --max-tokens 8 --seed 1
contains "decode 7 tokens"
expect 0 "run json" "$K" run $M --prompt-tokens 256,72,105 --max-tokens 5 --temperature 0 --json --logits-out "$W/l.npy"
contains '"tokens": \['
contains '"finish_reason": "length"'
[ -s "$W/l.npy" ] && ok || bad "no logits file"
# Same seed, same text.
"$K" run $M --prompt "abc" --max-tokens 12 --seed 9 --temperature 1 --json >"$W/a" 2>/dev/null
"$K" run $M --prompt "abc" --max-tokens 12 --seed 9 --temperature 1 --json >"$W/b" 2>/dev/null
# (Compare the tokens, not the timings.)
ta=$(grep -o '"tokens": [^]]*' "$W/a"); tb=$(grep -o '"tokens": [^]]*' "$W/b")
[ -n "$ta" ] && [ "$ta" = "$tb" ] && ok || bad "same seed gave different tokens"

expect 2 "run no prompt" "$K" run $M
expect 2 "run both prompts" "$K" run $M --prompt a --prompt-tokens 1
expect 2 "run bad flag" "$K" run $M --prompt a --frob
contains "unknown"
expect 2 "run bad number" "$K" run $M --prompt a --max-tokens 12x
contains "max-tokens"
expect 2 "run negative temp" "$K" run $M --prompt a --temperature -1
expect 2 "run bad token" "$K" run $M --prompt-tokens 1,x,3
contains "prompt-tokens"
expect 2 "run token out of vocab" "$K" run $M --prompt-tokens 1,5000
contains "vocabulary"
expect 2 "run block size" "$K" run $M --prompt a --block-size 3
expect 2 "run too long" "$K" run $M --prompt a --max-tokens 5000
contains "maximum model length"
expect 2 "run bad device" "$K" run $M --prompt a --device tpu
expect 2 "run presence penalty 3" "$K" run $M --prompt a --presence-penalty 3
contains "presence-penalty"
expect 0 "run with penalties" "$K" run $M --prompt "abcabc" --max-tokens 4 --repetition-penalty 1.3 --frequency-penalty 0.5
# Speculative decoding's flags: ranges, and the lookup lengths' order,
# refused by name in every command that takes them.
expect 2 "run speculative tokens 17" "$K" run $M --prompt a --num-speculative-tokens 17
contains "num-speculative-tokens"
expect 2 "run speculative tokens not a number" "$K" run $M --prompt a --num-speculative-tokens four
contains "num-speculative-tokens"
expect 2 "run prompt lookup max 0" "$K" run $M --prompt a --num-speculative-tokens 4 --prompt-lookup-max 0
contains "prompt-lookup-max"
expect 2 "run prompt lookup max 65" "$K" run $M --prompt a --num-speculative-tokens 4 --prompt-lookup-max 65
contains "prompt-lookup-max"
expect 2 "run prompt lookup min 65" "$K" run $M --prompt a --num-speculative-tokens 4 --prompt-lookup-min 65
contains "prompt-lookup-min"
expect 2 "run prompt lookup min over max" "$K" run $M --prompt a --num-speculative-tokens 4 \
    --prompt-lookup-min 3 --prompt-lookup-max 2
contains "prompt-lookup-min (3) exceeds --prompt-lookup-max (2)"
expect 2 "run prompt lookup min over the default max" "$K" run $M --prompt a --num-speculative-tokens 4 \
    --prompt-lookup-min 5
contains "prompt-lookup-min (5) exceeds --prompt-lookup-max"
expect 2 "run prompt lookup without speculative tokens" "$K" run $M --prompt a --prompt-lookup-max 3
contains "go with --num-speculative-tokens"
expect 2 "run speculative method bogus" "$K" run $M --prompt a --num-speculative-tokens 4 --speculative-method eagle
contains "speculative-method must be ngram or draft"
expect 2 "run speculative method without speculative tokens" "$K" run $M --prompt a --speculative-method ngram
contains "go with --num-speculative-tokens"
expect 2 "run draft method without a draft model" "$K" run $M --prompt a --num-speculative-tokens 4 --speculative-method draft
contains "speculative-method draft needs --draft-model"
expect 2 "run draft method with lookup flags" "$K" run $M --prompt a --num-speculative-tokens 4 --speculative-method draft \
    --draft-model "$W/tiny.gguf" --prompt-lookup-max 3
contains "go with --speculative-method ngram"
expect 2 "run draft model without the draft method" "$K" run $M --prompt a --draft-model "$W/tiny.gguf"
contains "draft-model goes with --speculative-method draft"
expect 2 "run acceptance bogus" "$K" run $M --prompt a --num-speculative-tokens 4 --speculative-method draft \
    --draft-model "$W/tiny.gguf" --speculative-acceptance typical
contains "speculative-acceptance must be exact or rejection"
expect 2 "run rejection sampling with prompt lookup" "$K" run $M --prompt a --num-speculative-tokens 4 \
    --speculative-acceptance rejection
contains "speculative-acceptance goes with --speculative-method draft"
expect 2 "serve rejection sampling without speculative tokens" "$K" serve $M --port 0 --speculative-acceptance exact
contains "go with --num-speculative-tokens"
expect 2 "serve disable-by-batch-size 0" "$K" serve $M --port 0 --num-speculative-tokens 2 --speculative-disable-by-batch-size 0
contains "speculative-disable-by-batch-size"
expect 2 "serve disable-by-batch-size without speculative tokens" "$K" serve $M --port 0 --speculative-disable-by-batch-size 4
contains "go with --num-speculative-tokens"
expect 2 "serve draft method without a draft model" "$K" serve $M --port 0 --num-speculative-tokens 2 --speculative-method draft
contains "speculative-method draft needs --draft-model"
expect 2 "perplexity draft method" "$K" perplexity $M --file /dev/null --num-speculative-tokens 2 --speculative-method draft
contains "speculative-method draft needs --draft-model"
expect 2 "serve sample threads 65" "$K" serve $M --port 0 --sample-threads 65
contains "sample-threads"
expect 2 "perplexity sample threads 65" "$K" perplexity $M --file /dev/null --sample-threads 65
contains "sample-threads"
expect 2 "serve speculative tokens 17" "$K" serve $M --port 0 --num-speculative-tokens 17
contains "num-speculative-tokens"
expect 2 "serve prompt lookup min over max" "$K" serve $M --port 0 --num-speculative-tokens 2 \
    --prompt-lookup-min 4 --prompt-lookup-max 3
contains "prompt-lookup-min (4) exceeds --prompt-lookup-max (3)"
expect 2 "eval prompt lookup max 65" "$K" eval $M --num-speculative-tokens 4 --prompt-lookup-max 65
contains "prompt-lookup-max"
expect 2 "bench --n with --multi-turn" "$K" bench --addr 127.0.0.1:1 --n 2 --multi-turn 2
contains "exclude each other"
expect 2 "bench --n 65" "$K" bench --addr 127.0.0.1:1 --n 65
contains "outside"
expect 2 "bench --temperature 3" "$K" bench --addr 127.0.0.1:1 --temperature 3
contains "temperature"
expect 2 "bench --top-p 0" "$K" bench --addr 127.0.0.1:1 --top-p 0
contains "top-p must be in (0, 1]"
expect 2 "run logit bias 101" "$K" run $M --prompt a --logit-bias 3:101
contains "logit-bias"
expect 2 "run logit bias without a bias" "$K" run $M --prompt a --logit-bias 3
contains "ID:BIAS"
expect 2 "run logit bias id out of vocab" "$K" run $M --prompt a --logit-bias 5000:1
contains "vocabulary"
expect 0 "run with a logit bias" "$K" run $M --prompt a --max-tokens 2 --logit-bias 3:1.5,4:-2

# Guided decoding: the text is a whole match, or JSON the schema accepts
# (from @FILE); patterns and schemas that cannot be honoured are refused.
txt=$("$K" run $M --prompt a --max-tokens 20 --seed 2 --temperature 1 \
      --guided-regex '[a-c]{3}-[0-9]{2}' 2>/dev/null)
if printf '%s' "$txt" | grep -Eqx '[a-c]{3}-[0-9]{2}'; then ok; else bad "run guided regex: '$txt'"; fi
printf '%s' '{"type":"object","properties":{"n":{"type":"integer","minimum":1,"maximum":9}},"required":["n"]}' >"$W/s.json"
txt=$("$K" run $M --prompt a --max-tokens 20 --seed 2 --temperature 1 \
      --guided-json @"$W/s.json" 2>/dev/null)
if printf '%s' "$txt" | grep -Eqx '\{ ?"n" ?: ?[1-9] ?\}'; then ok; else bad "run guided json: '$txt'"; fi
expect 2 "run guided regex unbalanced" "$K" run $M --prompt a --guided-regex 'a(b'
contains "guided-regex: at offset 3"
expect 2 "run guided json unsupported" "$K" run $M --prompt a --guided-json '{"not":{}}'
contains "guided-json: /: not"
expect 2 "run guided json unreadable" "$K" run $M --prompt a --guided-json @"$W/none.json"
contains "cannot read"
expect 2 "run guided regex and json" "$K" run $M --prompt a --guided-regex a --guided-json '{}'
contains "one at most"
txt=$("$K" run $M --prompt a --max-tokens 20 --seed 4 --temperature 1 \
      --guided-choice yes --guided-choice no --guided-choice maybe 2>/dev/null)
case "$txt" in yes|no|maybe) ok ;; *) bad "run guided choice: '$txt'" ;; esac
expect 2 "run guided choice empty" "$K" run $M --prompt a --guided-choice ''
contains "guided-choice"
# A GBNF grammar from @FILE: sums of small numbers in parentheses.
printf '%s\n' 'root ::= "(" sum ")"' 'sum  ::= num ("+" (num | "(" sum ")")){0,3}' \
    'num  ::= [1-9] [0-9]?' >"$W/sum.gbnf"
txt=$("$K" run $M --prompt a --max-tokens 40 --seed 5 --temperature 1 \
      --guided-grammar @"$W/sum.gbnf" 2>/dev/null)
if printf '%s' "$txt" | grep -Eq '^\([1-9][0-9]?(\+([1-9(]|[0-9]|\)|\+)*)*\)$' &&
   [ "$(printf '%s' "$txt" | tr -cd '(' | wc -c)" -eq "$(printf '%s' "$txt" | tr -cd ')' | wc -c)" ]
then ok; else bad "run guided grammar: '$txt'"; fi
expect 2 "run guided grammar undefined rule" "$K" run $M --prompt a --guided-grammar 'root ::= x y'
contains "guided-grammar: at offset 9: no rule 'x'"
expect 2 "run guided grammar unreadable" "$K" run $M --prompt a --guided-grammar @"$W/none.gbnf"
contains "guided-grammar: cannot read"
expect 2 "run guided grammar and regex" "$K" run $M --prompt a --guided-grammar 'root ::= "a"' \
    --guided-regex a
contains "one at most"

# eval --scenario: niah-multikey only, and the prefix cache serves the later
# turns' shared context whatever the (random) model answers.
expect 2 "eval scenario with another task" "$K" eval $M --scenario multi-turn --task vt
contains "niah-multikey"
expect 2 "eval bad scenario" "$K" eval $M --scenario sideways
contains "multi-turn, multi-request"
for mode in multi-turn multi-request; do
    expect 0 "eval --scenario $mode" "$K" eval $M --scenario $mode --lengths 512 --depths 0.5 --samples 1
    contains "  turn 1  turn 2  turn 3    mean  cached"
    contains "the prefix cache served [5-9][0-9]\.[0-9]% of the prompt tokens after turn 1"
done
# model random --vocab: another file's tokenizer and as many embedding rows.
expect 0 "random with a vocab" "$K" model random --shape llama-draft --dtype q8_0 --vocab "$W/tiny.gguf" --out "$W/draft.gguf"
expect 0 "info of it" "$K" model info "$W/draft.gguf"
contains "vocab 259, .*tokenizer gpt2-bytes"
expect 2 "random with a missing vocab" "$K" model random --shape tiny --dtype f16 --vocab "$W/none.gguf" --out "$W/x.gguf"
contains "^kvserve model random: --vocab '"
# eval lengths count the model's tokens: with GPT-2's BPE a 300-token
# passkey prompt is some 1100 bytes; the prompts' tokens, BOS included, are
# 301 less the answer's (1 to 3 tokens), at most 2 under where no byte
# length gives 300 exactly.
VD=${KVS_VOCAB_DIR:-$(dirname "$0")/../../../shared/data/vocab}
if [ -f "$VD/ggml-vocab-gpt-2.gguf" ]; then
    expect 0 "random with gpt-2's vocab" "$K" model random --shape tiny --dtype f16 --vocab "$VD/ggml-vocab-gpt-2.gguf" --out "$W/bpe.gguf"
    expect 0 "eval in BPE tokens" "$K" eval --model "$W/bpe.gguf" --task passkey --lengths 300 --depths 0.5 --samples 2
    contains "2 prompts, \(59[0-9]\|600\) tokens"
    # A long piece listed whole: StarCoder spells 256 spaces as one token.
    printf '%300s' '' | "$K" model tokenize --no-bos "$VD/ggml-vocab-starcoder.gguf" >"$W/out" 2>&1
    if [ "$(head -1 "$W/out" | cut -f2 | wc -c)" -eq 259 ]; then ok; else bad "tokenize long piece: $(head -c 80 "$W/out")"; fi
else
    echo "note: no vocab directory $VD, BPE eval not run"
fi
# perplexity: teacher-forced scoring through the engine.  The bundled
# model knows its filler text (perplexity near 1) and not random letters;
# settings that keep every key (a window or budget past the context) score
# as dense attention does.
python3 -c "print('The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ' * 40, end='')" >"$W/noise.txt"
python3 -c "import random; random.seed(3); print(''.join(random.choice('abcdefghij klmnop.') for _ in range(4000)), end='')" >"$W/rand.txt"
ppl() { # FILE FLAGS...: the nll per token of the first --ctx
    f=$1; shift
    "$K" perplexity --model "$BUNDLED" --file "$f" --ctx 512 --score 64 --windows 3 --json "$W/ppl.json" "$@" >"$W/out" 2>&1 &&
        python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['results'][0]['nll_per_token'])" "$W/ppl.json"
}
BUNDLED="$(dirname "$0")/../../weights/kvserve-main.gguf"
if [ -f "$BUNDLED" ]; then
    # Speculative decoding by prompt lookup changes no token: greedy text
    # with and without it is the same, and a prompt the output repeats has
    # proposals accepted.
    SP="The grass is green. The sky is blue. The sun is yellow. Here we go. The grass is green. The sky is"
    "$K" run --model "$BUNDLED" --prompt "$SP" --max-tokens 48 --temperature 0 --json >"$W/a" 2>/dev/null
    "$K" run --model "$BUNDLED" --prompt "$SP" --max-tokens 48 --temperature 0 --json \
        --num-speculative-tokens 4 >"$W/b" 2>"$W/out"
    ta=$(grep -o '"tokens": [^]]*' "$W/a"); tb=$(grep -o '"tokens": [^]]*' "$W/b")
    [ -n "$ta" ] && [ "$ta" = "$tb" ] && ok || bad "run --num-speculative-tokens 4 changed the greedy tokens"
    if grep -q "speculative decoding accepted [1-9][0-9]* of " "$W/out"; then ok; else bad "run --num-speculative-tokens 4: no proposal accepted: $(tail -1 "$W/out")"; fi
    # So does the bundled draft model's: its proposals, drawn like the rest.
    "$K" run --model "$BUNDLED" --prompt "$SP" --max-tokens 48 --temperature 0 --json \
        --num-speculative-tokens 4 --speculative-method draft \
        --draft-model "$(dirname "$BUNDLED")/kvserve-draft.gguf" >"$W/b" 2>"$W/out"
    tb=$(grep -o '"tokens": [^]]*' "$W/b")
    [ -n "$ta" ] && [ "$ta" = "$tb" ] && ok || bad "run --speculative-method draft changed the greedy tokens"
    if grep -q "speculative decoding accepted [1-9][0-9]* of " "$W/out"; then ok; else bad "run --speculative-method draft: no proposal accepted: $(tail -1 "$W/out")"; fi
    # Rejection sampling: greedy tokens unchanged; a seeded draw at
    # temperature 1 runs through it, its proposals accepted.
    "$K" run --model "$BUNDLED" --prompt "$SP" --max-tokens 48 --temperature 0 --json \
        --num-speculative-tokens 4 --speculative-method draft --speculative-acceptance rejection \
        --draft-model "$(dirname "$BUNDLED")/kvserve-draft.gguf" >"$W/b" 2>"$W/out"
    tb=$(grep -o '"tokens": [^]]*' "$W/b")
    [ -n "$ta" ] && [ "$ta" = "$tb" ] && ok || bad "run --speculative-acceptance rejection changed the greedy tokens"
    "$K" run --model "$BUNDLED" --prompt "$SP" --max-tokens 48 --temperature 1 --seed 7 --ignore-eos --json \
        --num-speculative-tokens 4 --speculative-method draft --speculative-acceptance rejection \
        --draft-model "$(dirname "$BUNDLED")/kvserve-draft.gguf" >"$W/b" 2>"$W/out"
    n=$(grep -o '"tokens": [^]]*' "$W/b" | tr ',' '\n' | grep -c '[0-9]')
    if [ "$n" = 48 ] && grep -q "speculative decoding accepted [1-9][0-9]* of " "$W/out"; then ok; else bad "run --speculative-acceptance rejection at temperature 1: $n tokens, $(tail -1 "$W/out")"; fi
    a=$(ppl "$W/noise.txt"); b=$(ppl "$W/rand.txt")
    if python3 -c "import sys; a, b = map(float, sys.argv[1:]); sys.exit(not (a < 0.4 and b > 1.6))" "$a" "$b"; then ok; else bad "perplexity: nll $a on the filler, $b on random letters"; fi
    c=$(ppl "$W/rand.txt" --attention sink-window --attn-window 4096); d=$(ppl "$W/rand.txt" --kv-policy sink-eviction --kv-budget 4096)
    if python3 -c "import sys; b, c, d = map(float, sys.argv[1:]); sys.exit(not (abs(b - c) < 1e-4 and abs(b - d) < 1e-4))" "$b" "$c" "$d"; then ok; else bad "perplexity: dense $b, full window $c, full budget $d"; fi
    # Scoring the prefill's rows: dense and a window past the context equal
    # the teacher-forced decode's numbers.
    e=$(ppl "$W/rand.txt" --scoring prefill); f=$(ppl "$W/rand.txt" --scoring prefill --attention sink-window --attn-window 4096)
    if python3 -c "import sys; b, e, f = map(float, sys.argv[1:]); sys.exit(not (abs(b - e) < 1e-4 and abs(b - f) < 1e-4))" "$b" "$e" "$f"; then ok; else bad "perplexity: decode $b, prefill-scored $e, with a full window $f"; fi
    # Forced tokens fed several a step as verified proposals score the same.
    g=$(ppl "$W/rand.txt" --num-speculative-tokens 8)
    if python3 -c "import sys; b, g = map(float, sys.argv[1:]); sys.exit(not abs(b - g) < 1e-4)" "$b" "$g"; then ok; else bad "perplexity: decode $b, with --num-speculative-tokens 8 $g"; fi
    expect 2 "perplexity bad scoring" "$K" perplexity --text abc --scoring both
    contains "decode or prefill"
    # --json -: stdout is the one JSON document, the table on stderr.
    for cmd in "perplexity --file $W/rand.txt --ctx 256 --score 32 --windows 1" \
        "eval --task passkey --lengths 256 --depths 0.5 --samples 1"; do
        # shellcheck disable=SC2086
        if "$K" $cmd --model "$BUNDLED" --json - >"$W/json.out" 2>"$W/out" &&
            python3 -c "import json,sys; json.load(open(sys.argv[1]))" "$W/json.out"; then ok; else bad "${cmd%% *} --json -: stdout is not one JSON document"; fi
    done
else
    echo "note: no bundled model at $BUNDLED, perplexity values not checked"
fi
expect 2 "perplexity without a text" "$K" perplexity
contains "give the text with --file or --text"
expect 2 "perplexity score over half" "$K" perplexity --text "abc" --ctx 64 --score 40
contains "more than half"
expect 2 "perplexity text too short" "$K" perplexity --text "abc" --ctx 64 --score 8
contains "fewer than one window"
expect 2 "perplexity ctx past the model" "$K" perplexity --file "$W/noise.txt" --ctx 100000 --score 8
contains "exceeds the model"

# serve --chat-template: a family's name or a file of one; anything else
# stops the server at start.
expect 2 "serve unknown chat template" "$K" serve --chat-template phi3 --port 0
contains "neither a template name (llama3, llama3.1, llama2, mistral, chatml) nor a readable file"
echo '{{ messages | tojson }}' >"$W/other.jinja"
expect 2 "serve a chat template kvserve cannot render" "$K" serve --chat-template "$W/other.jinja" --port 0
contains "not a template kvserve can render"
# Quest at decode: covering every block decodes as dense; two blocks of
# 16 on a 250-token prompt change the bundled model's greedy text.
QP="--prompt-tokens $(seq -s, 1 250) --max-tokens 24 --temperature 0 --ignore-eos --json"
ta=$("$K" run $QP 2>/dev/null | grep -o '"tokens": [^]]*')
tb=$("$K" run $QP --decode-top-k 1000 2>/dev/null | grep -o '"tokens": [^]]*')
tc=$("$K" run $QP --decode-top-k 2 2>/dev/null | grep -o '"tokens": [^]]*')
[ -n "$ta" ] && [ "$ta" = "$tb" ] && ok || bad "--decode-top-k 1000 differs from dense: $tb vs $ta"
[ -n "$tc" ] && [ "$tc" != "$ta" ] && ok || bad "--decode-top-k 2 gave dense decoding's tokens: $tc"
# With speculative decoding, verification rows choose their blocks as rows
# decoded alone do: the same tokens, proposals accepted.
SP="The grass is green. The sky is blue. The sun is yellow. The grass is green. The sky is blue. The sun is yellow. The grass is"
q0=$("$K" run --prompt "$SP" --max-tokens 48 --temperature 0 --ignore-eos --decode-top-k 1 --json 2>/dev/null | grep -o '"tokens": [^]]*')
"$K" run --prompt "$SP" --max-tokens 48 --temperature 0 --ignore-eos --decode-top-k 1 --json \
    --num-speculative-tokens 4 >"$W/a" 2>"$W/out"
q1=$(grep -o '"tokens": [^]]*' "$W/a")
[ -n "$q0" ] && [ "$q0" = "$q1" ] && ok || bad "--decode-top-k 1 with prompt lookup: $q1 vs $q0"
contains "speculative decoding accepted [1-9]"
expect 2 "run decode top k not a number" "$K" run --prompt a --decode-top-k x
contains "decode-top-k"
# Memory sizes take units: the same bytes give the same pool either way.
blocks() {
    # Gone first: the loop below must not find the last server's line
    # before this one's shell has truncated the file.
    rm -f "$W/s.err"
    "$K" serve $M --port 0 "$@" >"$W/s.out" 2>"$W/s.err" &
    sp=$!
    i=0
    while [ $i -lt 100 ] && ! grep -qs "KV blocks" "$W/s.err"; do sleep 0.1; i=$((i + 1)); done
    kill "$sp" 2>/dev/null; wait "$sp" 2>/dev/null
    grep -o "[0-9]* KV blocks" "$W/s.err" | head -1
}
b1=$(blocks --kv-cache-memory 2097152 --host-kv-memory 1048576)
b2=$(blocks --kv-cache-memory 2Mi --host-kv-memory 1MiB)
b3=$(blocks --kv-cache-memory 2.097152M --host-kv-memory 1Mi)
if [ -n "$b1" ] && [ "$b1" = "$b2" ] && [ "$b1" = "$b3" ]; then ok; else bad "sizes with units: '$b1' '$b2' '$b3'"; fi
expect 2 "serve kv cache memory with an unknown unit" "$K" serve $M --port 0 --kv-cache-memory 2Xi
contains "expected a size in bytes, or with a unit"
expect 2 "run host kv memory past 2^63" "$K" run $M --prompt a --host-kv-memory 10000000T
contains "more than 2^63 bytes"
expect 1 "run missing model" "$K" run --model "$W/none.gguf" --prompt a
contains "cannot load model"

# Bad files: truncated, garbage, empty.
head -c 1000 "$W/tiny.gguf" >"$W/trunc.gguf"
expect 1 "truncated" "$K" run --model "$W/trunc.gguf" --prompt a
contains "cannot load model"
head -c 4096 /dev/urandom >"$W/garbage.gguf" 2>/dev/null || printf 'xxxxxxxxxxxxxxxxxxxx' >"$W/garbage.gguf"
expect 1 "garbage" "$K" model info "$W/garbage.gguf"
: >"$W/empty.gguf"
expect 1 "empty" "$K" run --model "$W/empty.gguf" --prompt a

echo "$pass passed, $fails failed"
[ "$fails" -eq 0 ]
