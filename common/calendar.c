/* calendar.c: UTC calendar dates and months as the APIs take them (see
 * calendar.h). */
#include "common/calendar.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int calendar_digits(const char *s, int n)
{
    for (int i = 0; i < n; i++)
        if (s[i] < '0' || s[i] > '9') return 0;
    return 1;
}

int calendar_valid_date(const char *s)
{
    static const int days[] = {31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31};
    int y, m, d, leap;
    if (!s || strlen(s) != 10 || s[4] != '-' || s[7] != '-' || !calendar_digits(s, 4) ||
        !calendar_digits(s + 5, 2) || !calendar_digits(s + 8, 2))
        return -1;
    y = atoi(s);
    m = atoi(s + 5);
    d = atoi(s + 8);
    leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    if (y < 2000 || y > 9999 || m < 1 || m > 12 || d < 1) return -1;
    if (d > days[m - 1] + (m == 2 && leap)) return -1;
    return 0;
}

int calendar_valid_month(const char *s, char next[8])
{
    int y, m;
    if (!s || strlen(s) != 7 || s[4] != '-' || !calendar_digits(s, 4) || !calendar_digits(s + 5, 2))
        return -1;
    y = atoi(s);
    m = atoi(s + 5);
    if (y < 2000 || y > 9998 || m < 1 || m > 12) return -1;
    {
        char buf[32]; /* wide enough for any int, so no truncation to reason about */
        snprintf(buf, sizeof buf, "%04d-%02d", m == 12 ? y + 1 : y, m == 12 ? 1 : m + 1);
        memcpy(next, buf, 8);
    }
    return 0;
}
