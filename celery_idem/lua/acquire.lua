-- acquire: take the lease on an idempotency record, or say why not.
--
-- A record is one hash: state ('running' | 'done' | 'failed' | 'free'), token (the
-- fencing token, raised by every acquisition and never lowered while the record
-- exists), holder (task id of the run), expires (lease end, ms of server time),
-- and, once finished, result / ctype / cenc (the encoded outcome).
--
-- KEYS[1]  the record
-- ARGV[1]  holder: id of the task asking
-- ARGV[2]  lease length, ms
-- ARGV[3]  how long a finished record is kept, ms (the record outlives the lease by this)
--
-- Returns one of
--   {0, token, taken_over}                         ACQUIRED; taken_over is 1 when an expired
--                                                  lease of another run was taken over
--   {1, token, state, result, ctype, cenc}         FINISHED: state 'done' or 'failed'
--   {2, holder, ms_left, token}                    BUSY: a live run holds the lease
local key = KEYS[1]
local rec = redis.call('HMGET', key, 'state', 'token', 'holder', 'expires', 'result', 'ctype', 'cenc')
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
local token = redis.call('HINCRBY', key, 'token', 1)
redis.call('HSET', key, 'state', 'running', 'holder', ARGV[1], 'expires', now + lease)
redis.call('PEXPIRE', key, lease + tonumber(ARGV[3]))
if state == 'running' then
  return {0, token, 1}
end
return {0, token, 0}
