-- acquire: take the lease on an idempotency record, or say why not.
--
-- A record is one hash: state ('running' | 'done' | 'failed' | 'free'), token (the
-- fencing token, raised by every acquisition and never lowered while the record
-- exists), fence (see below), holder (task id of the run), run (id of the delivery
-- that holds it), expires (lease end, ms
-- of server time), and, once finished, result / ctype / cenc (the encoded outcome).
-- The record's steps (values stored by self.idempotency.step) are a second hash
-- beside it, in the same hash slot.
--
-- The fence only grows across every run of the key, also across a record that
-- expired and was made again: each acquisition sets it to the larger of the last
-- fence + 1 and the server's clock in microseconds, so a new record starts above
-- any fence an earlier record of the key could have handed out (unless the
-- server's clock went back by more than the time since).
--
-- KEYS[1]  the record
-- KEYS[2]  its steps
-- ARGV[1]  holder: id of the task asking
-- ARGV[2]  lease length, ms
-- ARGV[3]  how long a finished record is kept, ms (the record outlives the lease by this)
-- ARGV[4]  run: an id of this delivery's run ('' if none), so that the worker's main
--          process can free the key of a run it saw die, and no other run's
--
-- Returns one of
--   {0, token, taken_over, fence, first, steps}    ACQUIRED; taken_over is 1 when an expired
--                                                  lease of another run was taken over; first
--                                                  is 1 when no record existed (no earlier run
--                                                  of this key can have stored anything);
--                                                  steps is the steps hash as a flat list
--   {1, token, state, result, ctype, cenc}         FINISHED: state 'done' or 'failed'
--   {2, holder, ms_left, token}                    BUSY: a live run holds the lease
local key = KEYS[1]
local rec = redis.call('HMGET', key, 'state', 'token', 'holder', 'expires', 'result', 'ctype', 'cenc', 'fence')
local state = rec[1]
if state == 'done' or state == 'failed' then
  return {1, tonumber(rec[2]), state, rec[5], rec[6], rec[7]}
end
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
if state == 'running' then
  local left = tonumber(rec[4]) - now
  if left > 0 then
    return {2, rec[3], left, tonumber(rec[2])}
  end
end
local lease = tonumber(ARGV[2])
local ttl = lease + tonumber(ARGV[3])
local clock = tonumber(time[1]) * 1000000 + tonumber(time[2])
local fence = math.max((tonumber(rec[8]) or 0) + 1, clock)
local token = redis.call('HINCRBY', key, 'token', 1)
-- '%.0f': Lua would print a number this large in exponent notation.
redis.call('HSET', key, 'state', 'running', 'holder', ARGV[1], 'expires', now + lease,
  'fence', string.format('%.0f', fence), 'run', ARGV[4])
redis.call('PEXPIRE', key, ttl)
local steps = {}
if state then
  steps = redis.call('HGETALL', KEYS[2])
  if #steps > 0 then
    redis.call('PEXPIRE', KEYS[2], ttl)
  end
end
return {0, token, state == 'running' and 1 or 0, string.format('%.0f', fence), state and 0 or 1, steps}
