-- renew: extend a lease the caller still holds.
--
-- KEYS[1]  the record
-- KEYS[2]  its steps (their TTL follows the record's)
-- KEYS[3]  the counters of its shard
-- ARGV[1]  the caller's fencing token
-- ARGV[2]  lease length, ms
-- ARGV[3]  how long a finished record is kept, ms
-- ARGV[4]  the task's name, for the counters ('' counts nothing)
--
-- Returns 1 when renewed, 0 when the caller no longer holds the lease (another run
-- took it over, or it was released or finished); a lease found taken over is
-- counted as lost, once per token.
local key = KEYS[1]
local rec = redis.call('HMGET', key, 'state', 'token', 'losttok')
if rec[1] ~= 'running' or rec[2] ~= ARGV[1] then
  if rec[1] and rec[2] ~= ARGV[1] and rec[3] ~= ARGV[1] then
    redis.call('HSET', key, 'losttok', ARGV[1])
    if ARGV[4] ~= '' then
      redis.call('HINCRBY', KEYS[3], ARGV[4] .. '\31leases_lost', 1)
    end
  end
  return 0
end
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local lease = tonumber(ARGV[2])
redis.call('HSET', key, 'expires', now + lease)
redis.call('PEXPIRE', key, lease + tonumber(ARGV[3]))
redis.call('PEXPIRE', KEYS[2], lease + tonumber(ARGV[3]))
return 1
