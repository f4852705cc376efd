/*
 * tgf-launcher: a fork-mode bot's watcher process, in C with libc only.
 *
 *     tgf-launcher PYTHON SOCKET NAME CONFIG
 *
 * What botrunner/launcher.py does, at ~0.2 MB instead of a Python interpreter's
 * ~3 MB, once per bot: Circus supervises it as it would the bot (respawn, stop,
 * signals, exit codes). It asks the fleet's fork server (botrunner.forkserver) on
 * SOCKET for bot NAME, hands it its own stdin/stdout/stderr (the watcher's log
 * files), forwards the signals it gets to the bot, and exits as the bot did. When
 * the fork server cannot be reached within FORK_WAIT_MS, or refuses, it becomes the
 * bot itself: exec PYTHON -m botrunner CONFIG, what an exec-mode watcher runs.
 *
 * The wire format and the exchange with the bot over the socket pair are
 * launcher.py's (its docstring; the fork server imports the constants from there):
 * the bot writes "D" once it runs as its own user, the launcher answers "G", and the
 * bot writes "X<code>\n" as it exits. The fork server, the bot's parent, sends
 * "exit <wait status>" once it reaped it. tests/integration/test_fork.py runs both
 * launchers against the real fork server, and tests/unit/test_forked.py holds their
 * constants to each other.
 *
 * Built by setup.py into the wheel, and by scripts/_venv.sh into a checkout
 * (botrunner/buildlauncher.py); where it is missing, the fleet runs launcher.py.
 */
#define _GNU_SOURCE
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define PROTOCOL "tgfleet-fork 1"
#define FORK_WAIT_MS 1000   /* launcher.FORK_WAIT_S */
#define STATUS_WAIT_MS 3000 /* launcher.STATUS_WAIT_S */
#define MAX_MESSAGE 65536   /* launcher.MAX_MESSAGE */
#define MAX_PENDING 256
#define PAIR_BUFFER 256

static const int FORWARDED[] = {SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2, SIGWINCH};
#define N_FORWARDED (sizeof FORWARDED / sizeof FORWARDED[0])

static const char *bot_name = "?";
static int signal_pipe[2] = {-1, -1};
static int pending[MAX_PENDING]; /* signals received before the bot could take them */
static size_t n_pending;
static int pidfd = -1;
static int dropped; /* the bot runs as its own user: signals go to it from now on */
static char message[MAX_MESSAGE];

static void say(const char *format, ...) {
    char text[1024];
    va_list args;
    va_start(args, format);
    vsnprintf(text, sizeof text, format, args);
    va_end(args);
    dprintf(2, "launcher bot=%s: %s\n", bot_name, text);
}

static void on_signal(int signum) {
    int saved = errno;
    unsigned char byte = (unsigned char)signum;
    ssize_t written = write(signal_pipe[1], &byte, 1); /* full pipe: a flood, one lost */
    (void)written;
    errno = saved;
}

static long long now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void forward(int signum) {
    if (syscall(SYS_pidfd_send_signal, pidfd, signum, NULL, 0) != 0 && errno != ESRCH)
        say("cannot forward signal %d: %s", signum, strerror(errno));
    /* ESRCH: already gone, its status is on its way */
}

/* Signals that arrived since the last call: forwarded, or kept for later. */
static void take_signals(void) {
    unsigned char bytes[64];
    ssize_t got;
    while ((got = read(signal_pipe[0], bytes, sizeof bytes)) > 0) {
        for (ssize_t i = 0; i < got; i++) {
            if (pidfd >= 0 && dropped)
                forward(bytes[i]);
            else if (n_pending < MAX_PENDING)
                pending[n_pending++] = bytes[i];
        }
    }
}

/* End this process the way a child with wait `status` ended (code or signal). */
static void exit_like(int status) {
    if (WIFSIGNALED(status)) {
        int sig = WTERMSIG(status);
        sigset_t set;
        if (sig != SIGKILL && sig != SIGSTOP)
            signal(sig, SIG_DFL);
        sigemptyset(&set);
        sigaddset(&set, sig);
        sigprocmask(SIG_UNBLOCK, &set, NULL);
        kill(getpid(), sig);
    }
    _exit(WIFEXITED(status) ? WEXITSTATUS(status) : 1);
}

/* Become the bot: what an exec-mode watcher runs (same env, limits, user). */
static void exec_bot(const char *python, const char *config, const char *why) {
    say("%s; starting the bot by exec", why);
    /* Held from here to the exec, so that none slips past the last look. */
    sigset_t forwarded, held;
    sigemptyset(&forwarded);
    for (size_t i = 0; i < N_FORWARDED; i++)
        sigaddset(&forwarded, FORWARDED[i]);
    sigprocmask(SIG_BLOCK, &forwarded, NULL);
    take_signals();
    for (size_t i = 0; i < N_FORWARDED; i++) {
        int sig = FORWARDED[i];
        if (sig != SIGTERM && sig != SIGINT)
            signal(sig, SIG_IGN); /* drops one held meanwhile: there was no bot for it */
        signal(sig, SIG_DFL);     /* TERM and INT stay held, if they were */
    }
    sigpending(&held);
    for (size_t i = 0; i < n_pending; i++)
        if (pending[i] == SIGTERM || pending[i] == SIGINT)
            _exit(0); /* asked to stop before the bot existed */
    if (sigismember(&held, SIGTERM) || sigismember(&held, SIGINT))
        _exit(0);
    /* One arriving from here on ends this process as it would the bot's. */
    sigprocmask(SIG_UNBLOCK, &forwarded, NULL);
    signal(SIGPIPE, SIG_DFL); /* an ignored signal stays ignored across exec */
    char *const argv[] = {(char *)python, "-m", "botrunner", (char *)config, NULL};
    execv(python, argv);
    say("cannot exec %s: %s", python, strerror(errno));
    _exit(1);
}

/* The decimal integer that is all of text[0:length] (an optional sign, a trailing
   newline allowed: what the fork server and the bot write), in a long; 0 when there
   is none. */
static int parse_integer(const char *text, size_t length, long *value) {
    char digits[32];
    if (length > 0 && text[length - 1] == '\n')
        length--;
    if (length == 0 || length >= sizeof digits)
        return 0;
    memcpy(digits, text, length);
    digits[length] = '\0';
    char *end;
    errno = 0;
    *value = strtol(digits, &end, 10);
    return errno == 0 && *end == '\0' && (isdigit((unsigned char)digits[length - 1]) != 0);
}

/* The exit status a bot's "X<code>" line stands for, as launcher.py computes it. */
static int status_of_code(long code) {
    return (int)((unsigned long)code & 0xFF) << 8;
}

static int set_timeout(int fd, int option, long long ms) {
    struct timeval tv = {.tv_sec = ms / 1000, .tv_usec = (ms % 1000) * 1000};
    if (ms <= 0)
        tv.tv_usec = 1; /* zero would mean: no timeout */
    return setsockopt(fd, SOL_SOCKET, option, &tv, sizeof tv);
}

/* The request: the protocol line, the bot's name, then its env, NUL-separated. */
static size_t encode_request(char *out, size_t room, const char *name, char **env) {
    size_t used = 0;
    const char *head[] = {PROTOCOL, name};
    for (size_t i = 0; i < 2; i++) {
        size_t len = strlen(head[i]);
        if (used + len + 1 > room)
            return 0;
        if (i)
            out[used++] = '\0';
        memcpy(out + used, head[i], len);
        used += len;
    }
    for (; env && *env; env++) {
        const char *equals = strchr(*env, '=');
        if (equals == NULL || equals == *env)
            continue; /* not KEY=VALUE: os.environ leaves it out too */
        size_t len = strlen(*env);
        if (used + 1 + len > room)
            return 0;
        out[used++] = '\0';
        memcpy(out + used, *env, len);
        used += len;
    }
    return used;
}

/*
 * Ask the fork server for the bot. Returns the connection (and fills pid and
 * pidfd), or -1 with `why` telling the reason.
 */
static int ask(const char *socket_path, int pair_end, long *pid, char *why, size_t why_size) {
    struct sockaddr_un address = {.sun_family = AF_UNIX};
    extern char **environ;
    int conn = -1;
    if (strlen(socket_path) >= sizeof address.sun_path) {
        snprintf(why, why_size, "no fork server (socket path too long)");
        return -1;
    }
    strcpy(address.sun_path, socket_path);
    size_t length = encode_request(message, sizeof message, bot_name, environ);
    if (length == 0) {
        snprintf(why, why_size, "no fork server (request over %d bytes)", MAX_MESSAGE);
        return -1;
    }
    conn = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
    if (conn < 0)
        goto failed;
    /* One FORK_WAIT_MS for each step, as launcher.py's settimeout gives it. */
    long long deadline = now_ms() + FORK_WAIT_MS;
    set_timeout(conn, SO_SNDTIMEO, FORK_WAIT_MS);
    while (connect(conn, (struct sockaddr *)&address, sizeof address) != 0) {
        if (errno != EINTR || now_ms() >= deadline)
            goto failed;
        set_timeout(conn, SO_SNDTIMEO, deadline - now_ms());
    }

    int fds[4] = {0, 1, 2, pair_end};
    union { /* aligned for struct cmsghdr, as cmsg(3) has it */
        char buffer[CMSG_SPACE(sizeof fds)];
        struct cmsghdr align;
    } control;
    memset(&control, 0, sizeof control);
    struct iovec part = {.iov_base = message, .iov_len = length};
    struct msghdr out = {
        .msg_iov = &part,
        .msg_iovlen = 1,
        .msg_control = control.buffer,
        .msg_controllen = sizeof control.buffer};
    struct cmsghdr *header = CMSG_FIRSTHDR(&out);
    header->cmsg_level = SOL_SOCKET;
    header->cmsg_type = SCM_RIGHTS;
    header->cmsg_len = CMSG_LEN(sizeof fds);
    memcpy(CMSG_DATA(header), fds, sizeof fds);
    deadline = now_ms() + FORK_WAIT_MS;
    set_timeout(conn, SO_SNDTIMEO, FORK_WAIT_MS);
    while (sendmsg(conn, &out, MSG_NOSIGNAL) < 0) {
        if (errno != EINTR || now_ms() >= deadline)
            goto failed;
        set_timeout(conn, SO_SNDTIMEO, deadline - now_ms());
    }

    union {
        char buffer[CMSG_SPACE(4 * sizeof(int))];
        struct cmsghdr align;
    } answer_control;
    struct iovec in_part = {.iov_base = message, .iov_len = sizeof message - 1};
    struct msghdr in = {
        .msg_iov = &in_part,
        .msg_iovlen = 1,
        .msg_control = answer_control.buffer,
        .msg_controllen = sizeof answer_control.buffer};
    ssize_t got;
    deadline = now_ms() + FORK_WAIT_MS;
    set_timeout(conn, SO_RCVTIMEO, FORK_WAIT_MS);
    while ((got = recvmsg(conn, &in, MSG_CMSG_CLOEXEC)) < 0) {
        if (errno != EINTR || now_ms() >= deadline)
            goto failed;
        set_timeout(conn, SO_RCVTIMEO, deadline - now_ms());
        in.msg_controllen = sizeof answer_control.buffer;
    }
    message[got] = '\0';
    int received[4];
    size_t n_received = 0;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&in); c; c = CMSG_NXTHDR(&in, c)) {
        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
            continue;
        size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        for (size_t i = 0; i < count && n_received < 4; i++)
            memcpy(&received[n_received++], CMSG_DATA(c) + i * sizeof(int), sizeof(int));
    }
    if (strncmp(message, "pid ", 4) == 0 && n_received == 1) {
        if (parse_integer(message + 4, (size_t)got - 4, pid) && *pid > 0) {
            pidfd = received[0];
            struct timeval none = {0, 0}; /* blocking again, without a timeout */
            setsockopt(conn, SOL_SOCKET, SO_RCVTIMEO, &none, sizeof none);
            return conn;
        }
    }
    for (size_t i = 0; i < n_received; i++)
        close(received[i]);
    if (strncmp(message, "error ", 6) == 0)
        snprintf(why, why_size, "no fork server (%.900s)", message + 6);
    else
        snprintf(why, why_size, "no fork server (unexpected answer '%.60s')", message);
    close(conn);
    return -1;

failed:
    snprintf(why, why_size, "no fork server (%s)", strerror(errno));
    if (conn >= 0)
        close(conn);
    return -1;
}

/* The bot's "X<code>\n" line, if it wrote one before it ended: 1 and its code. */
static int last_word(int pair, char *buffer, size_t used, long *code) {
    ssize_t got;
    while (used < PAIR_BUFFER - 1 &&
           (got = recv(pair, buffer + used, PAIR_BUFFER - 1 - used, MSG_DONTWAIT)) > 0)
        used += (size_t)got;
    const char *x = memchr(buffer, 'X', used);
    if (x == NULL)
        return 0;
    size_t head = (size_t)(x - buffer);
    if (!(head == 0 || (head == 1 && buffer[0] == 'D')))
        return 0;
    if (buffer[used - 1] != '\n')
        return 0;
    return parse_integer(x + 1, used - head - 1, code);
}

/* Until the bot ends: forward signals, then exit with its status. */
static void supervise(int conn, int pair, long pid) {
    enum { PAIR, CONN, PIDFD, SIGNALS };
    struct pollfd watched[4] = {
        {.fd = pair, .events = POLLIN},
        {.fd = conn, .events = POLLIN},
        {.fd = pidfd, .events = POLLIN},
        {.fd = signal_pipe[0], .events = POLLIN},
    };
    char buffer[PAIR_BUFFER];
    size_t used = 0;
    int have_status = 0, status = 0, have_code = 0, conn_open = 1;
    long own_code = 0;
    long long dead_at = -1;
    for (;;) {
        int timeout = -1;
        if (dead_at >= 0) {
            long long left = dead_at + STATUS_WAIT_MS - now_ms();
            if (have_status || !conn_open || left <= 0)
                break;
            timeout = (int)left + 1;
        }
        if (poll(watched, 4, timeout) < 0) {
            if (errno == EINTR)
                continue;
            say("poll: %s", strerror(errno));
            break;
        }
        if (watched[SIGNALS].revents)
            take_signals();
        if (watched[PAIR].revents) {
            ssize_t got = recv(pair, buffer + used, PAIR_BUFFER - 1 - used, MSG_DONTWAIT);
            if (got <= 0 && !(got < 0 && (errno == EAGAIN || errno == EINTR))) {
                watched[PAIR].fd = -1; /* its end closed: the bot is gone or going */
            } else if (got > 0) {
                used += (size_t)got;
                if (!dropped && used > 0 && buffer[0] == 'D') {
                    memmove(buffer, buffer + 1, --used);
                    dropped = 1;
                    send(pair, "G", 1, MSG_NOSIGNAL); /* gone already: its status follows */
                    for (size_t i = 0; i < n_pending; i++)
                        forward(pending[i]);
                    n_pending = 0;
                }
                if (used > 1 && buffer[0] == 'X' && buffer[used - 1] == '\n')
                    have_code = parse_integer(buffer + 1, used - 1, &own_code);
                if (used == PAIR_BUFFER - 1)
                    watched[PAIR].fd = -1; /* more than a bot ever says */
            }
        }
        if (watched[CONN].revents) {
            ssize_t got = recv(conn, message, sizeof message - 1, MSG_DONTWAIT);
            long value;
            if (got > 0) {
                if (got > 5 && strncmp(message, "exit ", 5) == 0 &&
                    parse_integer(message + 5, (size_t)got - 5, &value) && value >= 0 &&
                    value <= INT_MAX) {
                    status = (int)value;
                    have_status = 1;
                }
            } else if (!(got < 0 && (errno == EAGAIN || errno == EINTR))) {
                conn_open = 0; /* the fork server is gone */
                watched[CONN].fd = -1;
            }
        }
        if (watched[PIDFD].revents) {
            watched[PIDFD].fd = -1;
            dead_at = now_ms();
        }
        if (have_status && dead_at >= 0)
            break;
    }
    if (!have_status && !have_code)
        have_code = last_word(pair, buffer, used, &own_code);
    if (!have_status) {
        if (have_code) {
            status = status_of_code(own_code);
        } else {
            /* Neither its parent nor the bot told: it was killed (SIGKILL is the only
               death that leaves no word, short of a crash of the interpreter). */
            say("bot process %ld ended and nobody knows how: reporting SIGKILL", pid);
            status = SIGKILL;
        }
    }
    exit_like(status);
}

int main(int argc, char **argv) {
    if (argc != 5) {
        dprintf(2, "usage: tgf-launcher PYTHON SOCKET NAME CONFIG\n");
        _exit(64);
    }
    const char *python = argv[1], *socket_path = argv[2], *config = argv[4];
    bot_name = argv[3];
    signal(SIGPIPE, SIG_IGN); /* a closed log pipe or pair is an error, not our end */
    if (pipe2(signal_pipe, O_CLOEXEC | O_NONBLOCK) != 0) {
        say("pipe: %s", strerror(errno));
        _exit(1);
    }
    struct sigaction action = {.sa_handler = on_signal, .sa_flags = SA_RESTART};
    sigemptyset(&action.sa_mask);
    for (size_t i = 0; i < N_FORWARDED; i++)
        sigaction(FORWARDED[i], &action, NULL);
    sigset_t unblock;
    sigemptyset(&unblock);
    for (size_t i = 0; i < N_FORWARDED; i++)
        sigaddset(&unblock, FORWARDED[i]);
    sigprocmask(SIG_UNBLOCK, &unblock, NULL);

    int pair[2];
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, pair) != 0) {
        char why[128];
        snprintf(why, sizeof why, "no socket pair (%s)", strerror(errno));
        exec_bot(python, config, why);
    }
    char why[1024];
    long pid = 0;
    int conn = ask(socket_path, pair[1], &pid, why, sizeof why);
    close(pair[1]);
    if (conn < 0) {
        close(pair[0]);
        exec_bot(python, config, why);
    }
    take_signals();
    supervise(conn, pair[0], pid);
    return 1; /* supervise exits */
}
