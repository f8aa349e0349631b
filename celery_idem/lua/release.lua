-- release: give a lease back without an outcome, so the next delivery can run.
--
-- KEYS[1]  the record
-- KEYS[2]  its steps (kept as long as the record: the next run replays them)
-- KEYS[3]  the counters of its shard
-- ARGV[1]  'token' to match the caller's fencing token, 'holder' to match a task id,
--          'run' to match a task id and the id of its run (used by the worker's main
--          process to free the key of a run it saw die), or 'marker' to withdraw the
--          'queued' marker of a task id whose message could not be sent, or 'operator'
--          to free a key by hand (``celery idem release``) under the token the operator
--          saw: refused while its lease is live, unless forced
-- ARGV[2]  the token or task id
-- ARGV[3]  how long to keep the freed record, ms (it keeps the fencing token and the
--          fence, so the next run's are higher)
-- ARGV[4]  the run id ('run' only); '1' to free a live lease too ('operator' only)
-- ARGV[5]  the task's name, for the counters ('' counts nothing)
-- ARGV[6]  steps the run replayed, ARGV[7] transactions it ran, ARGV[8] transactions
--          it replayed (counted)
--
-- Returns 1 when released, 0 when the caller did not hold the lease; 'operator' also
-- returns 1 when the record is already free under that token (this call sent again),
-- 0 when another run acquired it since, and 2 when its lease is live and not forced.
local key, task = KEYS[1], ARGV[5]
local rec = redis.call('HMGET', key, 'state', 'token', 'holder', 'run', 'losttok')

local function count(name, n)
  if task ~= '' and n > 0 then
    redis.call('HINCRBY', KEYS[3], task .. '\31' .. name, n)
  end
end

if ARGV[1] == 'marker' then
  if rec[1] ~= 'queued' or rec[3] ~= ARGV[2] then
    return 0
  end
  if rec[2] then
    redis.call('HSET', key, 'state', 'free')
    redis.call('HDEL', key, 'holder', 'host')
  else
    redis.call('DEL', key)
  end
  return 1
end
if ARGV[1] == 'token' and rec[1] and rec[2] ~= ARGV[2] and rec[5] ~= ARGV[2] then
  -- Another run acquired the key since: this run lost its lease.
  redis.call('HSET', key, 'losttok', ARGV[2])
  count('leases_lost', 1)
  return 0
end
if ARGV[1] == 'operator' then
  if rec[2] ~= ARGV[2] then return 0 end
  if rec[1] == 'free' then return 1 end
  if rec[1] == 'running' and ARGV[4] ~= '1' then
    local time = redis.call('TIME')
    local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
    if (tonumber(redis.call('HGET', key, 'expires')) or 0) > now then return 2 end
  end
end
if rec[1] ~= 'running' then
  return 0
end
if ARGV[1] == 'token' then
  if rec[2] ~= ARGV[2] then return 0 end
elseif ARGV[1] == 'operator' then
  -- matched by token above
elseif rec[3] ~= ARGV[2] or (ARGV[1] == 'run' and rec[4] ~= ARGV[4]) then
  return 0
end
redis.call('HSET', key, 'state', 'free')
redis.call('HDEL', key, 'holder', 'expires', 'run', 'host')
redis.call('PEXPIRE', key, tonumber(ARGV[3]))
redis.call('PEXPIRE', KEYS[2], tonumber(ARGV[3]))
local counters = {token = 'released', operator = 'freed_by_operator'}
count(counters[ARGV[1]] or 'freed_after_crash', 1)
count('steps_replayed', tonumber(ARGV[6]))
count('transactions_run', tonumber(ARGV[7]))
count('transactions_replayed', tonumber(ARGV[8]))
return 1
