-- acquire: take the lease on an idempotency record, or say why not.
--
-- A record is one hash: state ('queued' | 'running' | 'done' | 'failed' | 'free'),
-- token (the fencing token, raised by every acquisition and never lowered while the
-- record exists), fence (see below), holder (task id of the run, or of the message
-- a 'queued' marker stands for), run (id of the delivery holding it), expires (lease
-- end, ms of server time), first ('1' when the holder's acquisition made the
-- record), task (the task's name) and host (the worker the holder runs on), both
-- for operators (``celery idem show``, ``list --task``), payload (digests of the call's arguments, when validated), and, once
-- finished, result / ctype / cenc (the encoded outcome). rrun / crun / erun /
-- losttok remember what was last counted, so that a call repeated after a lost
-- reply is not counted twice. The record's steps are a second hash beside it, and
-- its shard's counters a third, all in one hash slot.
--
-- The fence only grows across every run of the key, also across a record that
-- expired and was made again: each acquisition sets it to the larger of the last
-- fence + 1 and the server's clock in microseconds.
--
-- KEYS[1]  the record
-- KEYS[2]  its steps
-- KEYS[3]  the counters of its shard (field: task name, unit separator, counter)
-- ARGV[1]  holder: id of the task asking
-- ARGV[2]  lease length, ms
-- ARGV[3]  how long a finished record is kept, ms (the record outlives the lease by this)
-- ARGV[4]  run: the id of this delivery's run (a repeat of this very call matches it)
-- ARGV[5]  the task's name, for the counters ('' counts nothing)
-- ARGV[6]  the conflict policy the caller applies if the key is busy (counted)
-- ARGV[7]  the call's payload digests ('' when not validated)
-- ARGV[8]  backend errors this delivery met before this call (counted once per run)
-- ARGV[9]  host: the worker (node name) the holder runs on, for operators ('' if unknown)
--
-- Returns one of
--   {0, token, taken_over, fence, first, steps}    ACQUIRED; taken_over is 1 when an expired
--                                                  lease of another run was taken over; first
--                                                  is 1 when no run of the key came before;
--                                                  steps is the steps hash as a flat list
--   {1, token, state, result, ctype, cenc}         FINISHED: state 'done' or 'failed'
--   {2, holder, ms_left, token}                    BUSY: a live run holds the lease
--   {3, payload}                                   MISMATCH: the record is for other arguments
-- same_payload(a, b): from payload.lua, which the store puts before this script.

local key, run, task = KEYS[1], ARGV[4], ARGV[5]
local rec = redis.call('HMGET', key, 'state', 'token', 'holder', 'expires', 'result', 'ctype', 'cenc',
  'fence', 'run', 'payload', 'rrun', 'crun', 'erun', 'first')
local state = rec[1]

local function count(name, n)
  if task ~= '' and n > 0 then
    redis.call('HINCRBY', KEYS[3], task .. '\31' .. name, n)
  end
end

local errors = tonumber(ARGV[8])
if errors > 0 and rec[13] ~= run then
  count('backend_errors', errors)
  redis.call('HSET', key, 'erun', run)
end
-- A freed record's call never finished: a new call may bring other arguments.
if ARGV[7] ~= '' and rec[10] and state ~= 'free' and not same_payload(rec[10], ARGV[7]) then
  return {3, rec[10]}
end
if state == 'done' or state == 'failed' then
  if rec[11] ~= run then
    redis.call('HSET', key, 'rrun', run)
    count('replayed', 1)
  end
  return {1, tonumber(rec[2]), state, rec[5], rec[6], rec[7]}
end
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local lease = tonumber(ARGV[2])
local ttl = lease + tonumber(ARGV[3])
if state == 'running' then
  local left = tonumber(rec[4]) - now
  if rec[3] == ARGV[1] and rec[9] == run then
    -- This very call, sent again after its reply was lost: it holds the lease.
    redis.call('HSET', key, 'expires', now + lease)
    redis.call('PEXPIRE', key, ttl)
    return {0, tonumber(rec[2]), 0, rec[8], rec[14] == '1' and 1 or 0, redis.call('HGETALL', KEYS[2])}
  end
  if left > 0 then
    if rec[12] ~= run then
      redis.call('HSET', key, 'crun', run)
      count('conflicts_' .. ARGV[6], 1)
    end
    return {2, rec[3], left, tonumber(rec[2])}
  end
end
local clock = tonumber(time[1]) * 1000000 + tonumber(time[2])
local fence = string.format('%.0f', math.max((tonumber(rec[8]) or 0) + 1, clock))
local first = (not state or state == 'queued') and '1' or '0'
local token = redis.call('HINCRBY', key, 'token', 1)
redis.call('HSET', key, 'state', 'running', 'holder', ARGV[1], 'expires', now + lease, 'fence', fence,
  'run', run, 'first', first, 'task', task, 'host', ARGV[9] or '')
if ARGV[7] ~= '' then
  redis.call('HSET', key, 'payload', ARGV[7])
end
redis.call('PEXPIRE', key, ttl)
count('executed', 1)
local steps = {}
if first == '0' then
  steps = redis.call('HGETALL', KEYS[2])
  if #steps > 0 then
    redis.call('PEXPIRE', KEYS[2], ttl)
  end
end
if state == 'running' then
  count('takeovers', 1)
  return {0, token, 1, fence, 0, steps}
end
return {0, token, 0, fence, tonumber(first), steps}
