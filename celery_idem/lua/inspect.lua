-- inspect: read a record for an operator (``celery idem show``), changing nothing.
--
-- One script rather than a pipeline so that the server time the lease is measured
-- against is the clock of the node that holds the record (on a cluster too).
--
-- KEYS[1]  the record
-- KEYS[2]  its steps
--
-- Returns {fields, ttl, steps, now}: the record's fields as a flat list, its PTTL in
-- ms (-1 no expiry, -2 no record), the names of its steps, and the server's time in ms.
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
return {redis.call('HGETALL', KEYS[1]), redis.call('PTTL', KEYS[1]), redis.call('HKEYS', KEYS[2]), now}
