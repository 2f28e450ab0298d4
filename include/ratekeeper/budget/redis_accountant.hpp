// ratekeeper/budget/redis_accountant.hpp: budgets kept in Redis, shared by
// every instance, with settles journaled while Redis is away.
//
// The header's first name, kept so that existing includes build: new code
// includes ratekeeper/redis/accountant.hpp (RedisAccountant,
// RedisReservation, RedisAccountantOptions), which has the design. Needs
// ratekeeper::redis (hiredis) and the budget headers.
#ifndef RATEKEEPER_BUDGET_REDIS_ACCOUNTANT_HPP_
#define RATEKEEPER_BUDGET_REDIS_ACCOUNTANT_HPP_

#include "ratekeeper/redis/accountant.hpp"

#endif  // RATEKEEPER_BUDGET_REDIS_ACCOUNTANT_HPP_
