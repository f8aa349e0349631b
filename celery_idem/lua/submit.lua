-- submit: deduplicate a call when it is sent (idempotency_dedupe_on_submit).
--
-- If a record of the key exists (queued, running or finished), nothing is to be sent:
-- the caller returns the result handle of the task id it names. Otherwise a 'queued'
-- marker is written, naming this call's task id, with a TTL of its own (it expires if
-- the message is never consumed); a record freed by a failed run counts as absent,
-- and keeps its token and fence.
--
-- KEYS[1]  the record
-- KEYS[2]  the counters of its shard
-- ARGV[1]  the task id the call will be sent under
-- ARGV[2]  the call's payload digests ('' when not validated)
-- ARGV[3]  how long the marker lives, ms
-- ARGV[4]  the task's name, for the counters ('' counts nothing)
--
-- Returns {0} when the caller should send (the marker is written), {1, task id} when
-- it should not, or {3, payload} when the record is for other arguments.
-- same_payload(a, b): from payload.lua, which the store puts before this script.

local key, task = KEYS[1], ARGV[4]
local rec = redis.call('HMGET', key, 'state', 'holder', 'payload')
if ARGV[2] ~= '' and rec[3] and rec[1] ~= 'free' and not same_payload(rec[3], ARGV[2]) then
  return {3, rec[3]}
end
if rec[1] and rec[1] ~= 'free' and rec[2] then
  if task ~= '' then
    redis.call('HINCRBY', KEYS[2], task .. '\31deduplicated_on_submit', 1)
  end
  return {1, rec[2]}
end
redis.call('HSET', key, 'state', 'queued', 'holder', ARGV[1])
if task ~= '' then
  redis.call('HSET', key, 'task', task)
end
if ARGV[2] ~= '' then
  redis.call('HSET', key, 'payload', ARGV[2])
end
redis.call('HDEL', key, 'run', 'expires', 'first', 'host')
redis.call('PEXPIRE', key, tonumber(ARGV[3]))
return {0}
