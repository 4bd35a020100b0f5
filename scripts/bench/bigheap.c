/* The heap scan's benchmark: N blocks of SIZE bytes in one linked list that a global holds. At
 * exit the list is cut in the middle: the first half is still reachable, the second half's head
 * is definitely lost and the rest of it indirectly lost (memcheck and leakhunt both say so).
 *
 *   bigheap N SIZE */
#include <stdio.h>
#include <stdlib.h>

struct node {
    struct node *next;
};

struct node *head;

int main(int argc, char **argv) {
    long n = argc > 1 ? atol(argv[1]) : 1000000;
    long size = argc > 2 ? atol(argv[2]) : 100;
    if (size < (long)sizeof(struct node))
        size = sizeof(struct node);
    struct node *tail = NULL, *middle = NULL;
    for (long i = 0; i < n; i++) {
        struct node *b = malloc(size);
        if (!b)
            return 1;
        b->next = NULL;
        if (tail)
            tail->next = b;
        else
            head = b;
        tail = b;
        if (i == n / 2 - 1)
            middle = b;
    }
    if (middle)
        middle->next = NULL;
    printf("%ld blocks of %ld bytes\n", n, size);
    return 0;
}
