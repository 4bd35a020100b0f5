/* A small server-like program with two bugs for leakhunt to find:
 *   - handle_request() forgets to free the parsed request on the error path;
 *   - remember_user() copies every user name into a list that is never freed.
 * Build and run it under leakhunt with the README's first command. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct request {
    char *user;
    char *path;
};

struct node {
    char *name;
    struct node *next;
};

static struct node *users;

static struct request *parse(const char *line) {
    struct request *r = malloc(sizeof *r);
    char user[32], path[64];
    if (sscanf(line, "%31s %63s", user, path) != 2) {
        free(r);
        return NULL;
    }
    r->user = strdup(user);
    r->path = strdup(path);
    return r;
}

static void remember_user(const char *name) {
    struct node *n = malloc(sizeof *n);
    n->name = strdup(name);
    n->next = users;
    users = n;
}

static int handle_request(const char *line) {
    struct request *r = parse(line);
    if (!r)
        return -1;
    remember_user(r->user);
    if (strncmp(r->path, "/admin", 6) == 0)
        return 403; /* bug: r, r->user and r->path leak here */
    int status = 200;
    free(r->user);
    free(r->path);
    free(r);
    return status;
}

int main(void) {
    const char *requests[] = {"alice /index.html", "bob /admin/panel", "carol /about",
                              "dave /admin/users", "erin /index.html"};
    int ok = 0;
    for (int round = 0; round < 20; round++)
        for (size_t i = 0; i < sizeof requests / sizeof *requests; i++)
            ok += handle_request(requests[i]) == 200;
    printf("%d requests served\n", ok);
    return 0;
}
