/* calendar.h: the dates (YYYY-MM-DD) and months (YYYY-MM) that reports,
 * statements, periods and the gateway's usage answer take, checked before
 * any of them reaches SQL. Shared by both planes; owns no state. */
#ifndef POINTGATE_CALENDAR_H
#define POINTGATE_CALENDAR_H

/* 0 if S is a real calendar date YYYY-MM-DD (years 2000..9999). */
int calendar_valid_date(const char *s);
/* 0 if S is YYYY-MM (2000-01..9998-12); NEXT (8 bytes) gets the month after. */
int calendar_valid_month(const char *s, char next[8]);

#endif
