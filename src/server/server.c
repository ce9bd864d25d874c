/* server.c — the HTTP layer: libmicrohttpd with one thread per connection.
 *
 * A thread per connection lets a request simply block: a non-streaming request waits in the
 * access handler, a stream waits inside MHD's content-reader callback, each in a poll() on three
 * descriptors — the Gen's eventfd (tokens arrived), the client socket (POLLRDHUP: the client went
 * away) and the server's stop eventfd. So a disconnect is noticed the moment it happens, even
 * during a long prefill or a non-streaming generation, with no timers or busy waiting. The cost is
 * a mostly idle thread per open connection, fine for hundreds of clients; tens of thousands would
 * want MHD's suspend/resume instead. Compute never happens here: the engine thread runs the model
 * and only hands events over (see gen.c). */
#include "server/server.h"

#include <errno.h>
#include <microhttpd.h>
#include <netdb.h>
#include <poll.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "server/gen.h"
#include "server/metrics.h"
#include "server/openai.h"
#include "util/strbuf.h"

#define DEFAULT_MAX_BODY ((size_t)16 << 20)

struct Server {
    struct MHD_Daemon *d;
    Engine *engine;
    const Tok *tok;
    Metrics *metrics;
    StructVocab *vocab; /* structured outputs' view of the vocabulary */
    OaiContext ctx;
    char *api_key, *model_name, *model_root;
    size_t max_body;
    FILE *log;
    pthread_mutex_t log_mu;
    int stop_efd; /* readable once the server is stopping */
    int port;
};

/* One HTTP request (MHD's per-request context). */
typedef struct Conn {
    Server *srv;
    struct MHD_Connection *mc;
    char method[16], version[16];
    char *url;
    StrBuf body;
    bool too_big;
    double t0;
    int status;
    int prompt_tokens, completion_tokens; /* -1: not a generation */
} Conn;

/* A streaming response: owned by the MHD response, freed by stream_free. */
typedef struct Stream {
    Server *srv;
    Conn *conn; /* valid while MHD calls stream_read */
    int sock;
    OaiRequest req;
    Gen *gen;
    StrBuf out;
    size_t out_off;
    bool ended;
} Stream;

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void log_line(Server *s, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void log_line(Server *s, const char *fmt, ...) {
    if (!s->log) return;
    char stamp[32];
    time_t t = time(NULL);
    struct tm tm;
    localtime_r(&t, &tm);
    strftime(stamp, sizeof stamp, "%Y-%m-%d %H:%M:%S", &tm);
    va_list ap;
    va_start(ap, fmt);
    pthread_mutex_lock(&s->log_mu);
    fprintf(s->log, "%s ", stamp);
    vfprintf(s->log, fmt, ap);
    fputc('\n', s->log);
    fflush(s->log);
    pthread_mutex_unlock(&s->log_mu);
    va_end(ap);
}

static void mhd_logger(void *cls, const char *fmt, va_list ap) {
    Server *s = cls;
    if (!s->log) return;
    char msg[1024];
    vsnprintf(msg, sizeof msg, fmt, ap);
    size_t n = strlen(msg);
    while (n && msg[n - 1] == '\n') msg[--n] = '\0';
    log_line(s, "http: %s", msg);
}

/* ------------------------------------------------------------------ responses */

/* Queues body (malloc'd; taken) with a status and content type. */
static enum MHD_Result send_body(Conn *c, int status, char *body, const char *ctype) {
    struct MHD_Response *r = MHD_create_response_from_buffer(strlen(body), body, MHD_RESPMEM_MUST_FREE);
    if (!r) {
        free(body);
        return MHD_NO;
    }
    MHD_add_response_header(r, MHD_HTTP_HEADER_CONTENT_TYPE, ctype);
    enum MHD_Result ret = MHD_queue_response(c->mc, (unsigned)status, r);
    MHD_destroy_response(r);
    c->status = status;
    metrics_http_status(c->srv->metrics, status);
    return ret;
}

static enum MHD_Result send_error(Conn *c, const OaiError *e) {
    return send_body(c, e->status, oai_error_json(e), "application/json");
}

static enum MHD_Result send_errorf(Conn *c, int status, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static enum MHD_Result send_errorf(Conn *c, int status, const char *fmt, ...) {
    OaiError e = {.status = status};
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(e.message, sizeof e.message, fmt, ap);
    va_end(ap);
    return send_error(c, &e);
}

static char *xstrdup(const char *s) {
    char *d = strdup(s);
    if (!d) {
        fputs("quill: out of memory\n", stderr);
        abort();
    }
    return d;
}

/* ------------------------------------------------------------------ waiting */

typedef enum Wake { WAKE_EVENTS, WAKE_GONE, WAKE_STOP } Wake;

/* Blocks until the Gen has events, the client hangs up or the server stops. */
static Wake wait_events(Server *s, int sock, Gen *g) {
    struct pollfd fds[3] = {
        {.fd = gen_fd(g), .events = POLLIN},
        {.fd = sock, .events = POLLRDHUP},
        {.fd = s->stop_efd, .events = POLLIN},
    };
    for (;;) {
        int n = poll(fds, sock >= 0 ? 3 : 1, -1);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) return WAKE_GONE;
        if (fds[2].revents & POLLIN) return WAKE_STOP;
        if (fds[1].revents & (POLLRDHUP | POLLHUP | POLLERR | POLLNVAL)) return WAKE_GONE;
        if (fds[0].revents) return WAKE_EVENTS;
    }
}

static int conn_socket(struct MHD_Connection *mc) {
    const union MHD_ConnectionInfo *ci = MHD_get_connection_info(mc, MHD_CONNECTION_INFO_CONNECTION_FD);
    return ci ? ci->connect_fd : -1;
}

/* ------------------------------------------------------------------ streaming */

static ssize_t stream_read(void *cls, uint64_t pos, char *buf, size_t max) {
    (void)pos;
    Stream *st = cls;
    while (st->out_off == st->out.len) {
        st->out.len = st->out_off = 0;
        if (st->ended) return MHD_CONTENT_READER_END_OF_STREAM;
        int done = gen_pump(st->gen);
        oai_stream_chunks(&st->req, st->gen, &st->out);
        if (done) {
            oai_stream_end(&st->req, st->gen, &st->out);
            st->ended = true;
            st->conn->prompt_tokens = gen_prompt_tokens(st->gen);
            st->conn->completion_tokens = gen_completion_tokens(st->gen);
            continue;
        }
        if (st->out.len) break;
        if (wait_events(st->srv, st->sock, st->gen) != WAKE_EVENTS) {
            st->conn->completion_tokens = gen_completion_tokens(st->gen);
            return MHD_CONTENT_READER_END_WITH_ERROR; /* stream_free aborts the generation */
        }
    }
    size_t n = st->out.len - st->out_off;
    if (n > max) n = max;
    memcpy(buf, st->out.s + st->out_off, n);
    st->out_off += n;
    return (ssize_t)n;
}

static void stream_free(void *cls) {
    Stream *st = cls;
    gen_release(st->gen);
    oai_request_free(&st->req);
    sb_free(&st->out);
    free(st);
}

/* ------------------------------------------------------------------ endpoints */

static enum MHD_Result generate(Conn *c, OaiKind kind) {
    Server *s = c->srv;
    OaiRequest req;
    OaiError e;
    if (oai_parse(&req, kind, sb_str(&c->body), c->body.len, &s->ctx, &e)) return send_error(c, &e);
    QErr q;
    Gen *g = gen_new(s->engine, s->tok, s->metrics, &req.spec, &q);
    if (!g) {
        oai_request_free(&req);
        return send_errorf(c, 500, "%s", q.msg);
    }
    c->prompt_tokens = gen_prompt_tokens(g);
    c->completion_tokens = 0;
    if (gen_submit(g, &q)) {
        gen_release(g);
        oai_request_free(&req);
        return send_errorf(c, engine_failure(s->engine) ? 503 : 400, "%s", q.msg);
    }
    int sock = conn_socket(c->mc);
    if (req.stream) {
        Stream *st = calloc(1, sizeof *st);
        if (!st) {
            gen_release(g);
            oai_request_free(&req);
            return send_errorf(c, 500, "out of memory");
        }
        *st = (Stream){.srv = s, .conn = c, .sock = sock, .req = req, .gen = g};
        struct MHD_Response *r = MHD_create_response_from_callback(MHD_SIZE_UNKNOWN, 16 << 10, stream_read, st, stream_free);
        if (!r) {
            stream_free(st);
            return MHD_NO;
        }
        MHD_add_response_header(r, MHD_HTTP_HEADER_CONTENT_TYPE, "text/event-stream; charset=utf-8");
        MHD_add_response_header(r, MHD_HTTP_HEADER_CACHE_CONTROL, "no-cache");
        enum MHD_Result ret = MHD_queue_response(c->mc, MHD_HTTP_OK, r);
        MHD_destroy_response(r);
        c->status = 200;
        metrics_http_status(s->metrics, 200);
        return ret;
    }
    Wake w = WAKE_EVENTS;
    while (!gen_pump(g) && (w = wait_events(s, sock, g)) == WAKE_EVENTS) {
    }
    c->completion_tokens = gen_completion_tokens(g);
    if (w != WAKE_EVENTS) {
        gen_release(g);
        oai_request_free(&req);
        if (w == WAKE_STOP) return send_errorf(c, 503, "the server is shutting down");
        return MHD_NO; /* the client is gone: close the connection */
    }
    char *body = oai_response(&req, g);
    gen_release(g);
    oai_request_free(&req);
    return send_body(c, 200, body, "application/json");
}

static bool authorized(Server *s, struct MHD_Connection *mc) {
    if (!s->api_key) return true;
    const char *h = MHD_lookup_connection_value(mc, MHD_HEADER_KIND, MHD_HTTP_HEADER_AUTHORIZATION);
    if (!h || strncmp(h, "Bearer ", 7)) return false;
    return !strcmp(h + 7, s->api_key);
}

static enum MHD_Result dispatch(Conn *c, const char *url, const char *method) {
    Server *s = c->srv;
    bool get = !strcmp(method, "GET") || !strcmp(method, "HEAD"), post = !strcmp(method, "POST");
    if (c->too_big)
        return send_errorf(c, 413, "the request body exceeds the limit of %zu bytes", s->max_body);
    if (!strcmp(url, "/health")) {
        if (!get) return send_errorf(c, 405, "%s %s is not allowed (use GET)", method, url);
        const char *failure = engine_failure(s->engine);
        if (failure) return send_errorf(c, 503, "the engine has stopped serving: %s", failure);
        return send_body(c, 200, xstrdup(""), "text/plain");
    }
    if (!strcmp(url, "/metrics")) {
        if (!get) return send_errorf(c, 405, "%s %s is not allowed (use GET)", method, url);
        EngineStats st = engine_stats(s->engine);
        return send_body(c, 200, metrics_render(s->metrics, &st), "text/plain; version=0.0.4; charset=utf-8");
    }
    bool models = !strcmp(url, "/v1/models"), chat = !strcmp(url, "/v1/chat/completions"),
         completions = !strcmp(url, "/v1/completions"), tokenize = !strcmp(url, "/tokenize"),
         detokenize = !strcmp(url, "/detokenize");
    if (!models && !chat && !completions && !tokenize && !detokenize)
        return send_errorf(c, 404, "no route for %s %s", method, url);
    if (!authorized(s, c->mc))
        return send_errorf(c, 401, "Unauthorized: this server needs an API key (Authorization: Bearer KEY)");
    if (models) {
        if (!get) return send_errorf(c, 405, "%s %s is not allowed (use GET)", method, url);
        return send_body(c, 200, oai_models_json(&s->ctx), "application/json");
    }
    if (!post) return send_errorf(c, 405, "%s %s is not allowed (use POST)", method, url);
    if (tokenize || detokenize) {
        OaiError e;
        char *out = (tokenize ? oai_tokenize : oai_detokenize)(sb_str(&c->body), c->body.len, &s->ctx, &e);
        return out ? send_body(c, 200, out, "application/json") : send_error(c, &e);
    }
    return generate(c, chat ? OAI_CHAT : OAI_COMPLETION);
}

static enum MHD_Result on_request(void *cls, struct MHD_Connection *mc, const char *url, const char *method,
                                  const char *version, const char *upload, size_t *upload_size, void **con_cls) {
    Server *s = cls;
    Conn *c = *con_cls;
    if (!c) {
        if (!(c = calloc(1, sizeof *c)) || !(c->url = strdup(url))) {
            free(c);
            return MHD_NO;
        }
        c->srv = s;
        c->mc = mc;
        c->t0 = now();
        c->prompt_tokens = c->completion_tokens = -1;
        snprintf(c->method, sizeof c->method, "%s", method);
        snprintf(c->version, sizeof c->version, "%s", version);
        const char *cl = MHD_lookup_connection_value(mc, MHD_HEADER_KIND, MHD_HTTP_HEADER_CONTENT_LENGTH);
        if (cl && strtoull(cl, NULL, 10) > s->max_body) c->too_big = true;
        *con_cls = c;
        return MHD_YES;
    }
    if (*upload_size) {
        /* Past the limit the body is read and dropped, so the client gets a clean 413. */
        if (!c->too_big && c->body.len + *upload_size > s->max_body) {
            c->too_big = true;
            sb_free(&c->body);
        }
        if (!c->too_big) sb_append(&c->body, upload, *upload_size);
        *upload_size = 0;
        return MHD_YES;
    }
    return dispatch(c, url, method);
}

static void on_completed(void *cls, struct MHD_Connection *mc, void **con_cls, enum MHD_RequestTerminationCode toe) {
    Server *s = cls;
    Conn *c = *con_cls;
    if (!c) return;
    char host[NI_MAXHOST] = "?", serv[NI_MAXSERV] = "?";
    const union MHD_ConnectionInfo *ci = MHD_get_connection_info(mc, MHD_CONNECTION_INFO_CLIENT_ADDRESS);
    if (ci && ci->client_addr) {
        socklen_t len = ci->client_addr->sa_family == AF_INET6 ? sizeof(struct sockaddr_in6) : sizeof(struct sockaddr_in);
        getnameinfo(ci->client_addr, len, host, sizeof host, serv, sizeof serv, NI_NUMERICHOST | NI_NUMERICSERV);
    }
    char tokens[96] = "";
    if (c->prompt_tokens >= 0)
        snprintf(tokens, sizeof tokens, " prompt_tokens=%d completion_tokens=%d", c->prompt_tokens,
                 c->completion_tokens > 0 ? c->completion_tokens : 0);
    log_line(s, "%s:%s \"%s %s %s\" %d %.1f ms%s%s", host, serv, c->method, c->url, c->version, c->status,
             (now() - c->t0) * 1e3, tokens,
             toe == MHD_REQUEST_TERMINATED_COMPLETED_OK ? "" : " (connection closed before the response ended)");
    sb_free(&c->body);
    free(c->url);
    free(c);
    *con_cls = NULL;
}

/* ------------------------------------------------------------------ lifecycle */

static void server_free(Server *s) {
    if (!s) return;
    metrics_free(s->metrics);
    struct_vocab_free(s->vocab);
    free(s->api_key);
    free(s->model_name);
    free(s->model_root);
    if (s->stop_efd >= 0) close(s->stop_efd);
    pthread_mutex_destroy(&s->log_mu);
    free(s);
}

Server *server_start(Engine *e, const Tok *tok, const ServerOptions *o, QErr *err) {
    if (!tok) {
        qerr_set(err, "the server needs the model's tokenizer (tokenizer.json)");
        return NULL;
    }
    Server *s = calloc(1, sizeof *s);
    if (!s) {
        qerr_set(err, "out of memory");
        return NULL;
    }
    pthread_mutex_init(&s->log_mu, NULL);
    s->stop_efd = -1;
    s->engine = e;
    s->tok = tok;
    s->log = o->log;
    s->max_body = o->max_body_bytes ? o->max_body_bytes : DEFAULT_MAX_BODY;
    const Model *m = engine_model(e);
    if (!(s->model_name = strdup(o->model_name ? o->model_name : "quill")) ||
        !(s->model_root = strdup(o->model_root ? o->model_root : s->model_name)) ||
        (o->api_key && !(s->api_key = strdup(o->api_key))) || !(s->metrics = metrics_new(s->model_name))) {
        qerr_set(err, "out of memory");
        server_free(s);
        return NULL;
    }
    int32_t eos[2 * CONFIG_MAX_EOS];
    const int n_eos = model_eos_ids(m, eos); /* structured outputs end where generation does */
    if (!(s->vocab = struct_vocab_new(tok, m->cfg.vocab_size, eos, n_eos))) {
        qerr_set(err, "out of memory");
        server_free(s);
        return NULL;
    }
    SamplingParams d = sampling_greedy();
    d.temperature = m->gen.temperature;
    d.top_p = m->gen.top_p;
    d.top_k = m->gen.top_k > 0 ? m->gen.top_k : -1;
    d.min_p = m->gen.min_p;
    d.repetition_penalty = m->gen.repetition_penalty;
    s->ctx = (OaiContext){.tok = tok,
                          .model_name = s->model_name,
                          .model_root = s->model_root,
                          .max_model_len = o->max_model_len > 0 ? o->max_model_len : m->opt.max_ctx,
                          .vocab_size = m->cfg.vocab_size,
                          .defaults = d,
                          .vocab = s->vocab};
    if ((s->stop_efd = eventfd(0, EFD_CLOEXEC)) < 0) {
        qerr_set(err, "cannot create an eventfd: %s", strerror(errno));
        server_free(s);
        return NULL;
    }

    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM, .ai_flags = AI_PASSIVE}, *ai = NULL;
    char port[16];
    snprintf(port, sizeof port, "%d", o->port);
    int rc = getaddrinfo(o->host ? o->host : "127.0.0.1", port, &hints, &ai);
    if (rc) {
        qerr_set(err, "--host %s: %s", o->host ? o->host : "127.0.0.1", gai_strerror(rc));
        server_free(s);
        return NULL;
    }
    unsigned flags = MHD_USE_THREAD_PER_CONNECTION | MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_POLL | MHD_USE_ERROR_LOG;
    if (ai->ai_family == AF_INET6) flags |= MHD_USE_IPv6;
    if (engine_start(e, err)) {
        freeaddrinfo(ai);
        server_free(s);
        return NULL;
    }
    s->d = MHD_start_daemon(flags, (uint16_t)o->port, NULL, NULL, on_request, s,
                            MHD_OPTION_EXTERNAL_LOGGER, mhd_logger, s,
                            MHD_OPTION_SOCK_ADDR, ai->ai_addr,
                            MHD_OPTION_NOTIFY_COMPLETED, on_completed, s,
                            MHD_OPTION_CONNECTION_TIMEOUT, (unsigned)300,
                            MHD_OPTION_END);
    int bind_errno = errno;
    freeaddrinfo(ai);
    if (!s->d) {
        engine_stop(e);
        qerr_set(err, "cannot listen on %s:%d%s%s", o->host ? o->host : "127.0.0.1", o->port,
                 bind_errno == EADDRINUSE ? ": address already in use" : "",
                 bind_errno == EACCES ? ": permission denied" : "");
        server_free(s);
        return NULL;
    }
    const union MHD_DaemonInfo *di = MHD_get_daemon_info(s->d, MHD_DAEMON_INFO_BIND_PORT);
    s->port = di ? di->port : o->port;
    return s;
}

int server_port(const Server *s) { return s->port; }

void server_stop(Server *s) {
    if (!s) return;
    uint64_t one = 1;
    (void)!write(s->stop_efd, &one, sizeof one); /* wakes every waiting request */
    MHD_stop_daemon(s->d);
    /* Aborted requests leave once the engine has sent their last event. */
    for (int i = 0; i < 500 && metrics_active(s->metrics) > 0; i++) usleep(10000);
    engine_stop(s->engine);
    server_free(s);
}
