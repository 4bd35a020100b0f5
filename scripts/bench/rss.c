/* Runs a command and writes "PEAK_RSS_KIB EXIT_CODE ALL_KIB" to a file: the peak resident set
 * of the command's process tree (wait4's ru_maxrss), measured from a launcher too small to
 * inflate it (a Python parent's fork copy would count Python's own pages), and the largest of
 * every process it left behind too (the launcher is their subreaper and waits for them: the
 * preload alone's heap-scan helper, which is no child of the program's).
 *   rss OUTFILE COMMAND [ARGS...] */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: rss OUTFILE COMMAND [ARGS...]\n");
        return 2;
    }
    prctl(PR_SET_CHILD_SUBREAPER, 1);
    pid_t pid = fork();
    if (pid < 0) return 2;
    if (pid == 0) {
        execvp(argv[2], argv + 2);
        _exit(127);
    }
    int status;
    struct rusage ru;
    if (wait4(pid, &status, 0, &ru) < 0) return 2;
    int code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    int other;
    while (wait(&other) > 0 || errno == EINTR)
        ;
    struct rusage all;
    getrusage(RUSAGE_CHILDREN, &all);
    FILE *f = fopen(argv[1], "w");
    if (!f) return 2;
    fprintf(f, "%ld %d %ld\n", ru.ru_maxrss, code, all.ru_maxrss);
    fclose(f);
    return code;
}
